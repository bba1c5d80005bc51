"""The configurations the scripts measure, in one list: run_matrix (quality), bench_decode and gpu_suite (speed) and
compare_peers (against other libraries) each run every entry; bench_serve and kv_capacity take their quantized
layouts from it by name. A newly registered strategy is measured everywhere by adding one entry to PRESETS.

An entry is a strategy and its own options beyond sinks, window and budget: those are the library's defaults
(kv_cache's option dataclasses: sink 16, window 32, budget 256) unless a script passes its own.
"""
import dataclasses

from cli_options import parse_strategy_options, strategy_parser, whole_number
from kernels.formats import FORMATS


@dataclasses.dataclass(frozen=True)
class Preset:
    strategy: str
    argv: tuple = ()  # the strategy's own options (e.g. --bits 4), as on the command line
    variant: str = ""  # what tells it apart from other entries of its strategy (e.g. int4, then int4)

    @property
    def name(self) -> str:
        """The benches' row name: quantize_kv-int4, h2o-int4, full."""
        return f"{self.strategy}-{self.variant.split()[-1]}" if self.variant else self.strategy

    def takes(self, option: str) -> bool:
        """Whether the strategy has --option (e.g. sink_size)."""
        return any(action.dest == option for action in strategy_parser(self.strategy)._actions)

    def strategy_argv(self, sink_size: int = None, window_size: int = None, budget: int = None) -> list[str]:
        """The strategy's command-line options: sinks, window and budget where given and the strategy takes them,
        then this entry's own."""
        argv = []
        for option, value in (("sink_size", sink_size), ("window_size", window_size), ("budget", budget)):
            if value is not None and self.takes(option):
                argv += [f"--{option}", str(value)]
        return argv + list(self.argv)

    def options(self, sink_size: int = None, window_size: int = None, budget: int = None, extra=()) -> dict:
        """The cache's keyword arguments, the library's defaults filled in; extra: more command-line options."""
        return parse_strategy_options(self.strategy, self.strategy_argv(sink_size, window_size, budget) + list(extra))

    def label(self, sink_size: int = None, window_size: int = None, budget: int = None) -> str:
        """A table's name for it: "quantize_kv 16/32 int4", "h2o 16/32 budget 128 then int4"."""
        parts = [self.strategy]
        if sink_size is not None and self.takes("sink_size"):
            parts.append(f"{sink_size}/{window_size}")
        if budget is not None and self.takes("budget"):
            parts.append(f"budget {budget}")
        return " ".join(parts + ([self.variant] if self.variant else []))


PRESETS = [
    Preset("full"),
    Preset("compress_kv"),
    *(Preset("quantize_kv", ("--bits", f.name), f.label) for f in FORMATS.values()),
    # eviction under a fixed budget (kv_cache/evict.py), the kept tokens in the model dtype or quantized
    Preset("snapkv"), Preset("h2o"), Preset("tova"), Preset("expected_attention"),
    Preset("h2o", ("--then_bits", "4"), "then int4"),
    Preset("snapkv", ("--then_bits", "2"), "then int2"),
    Preset("snapkv", ("--head_budget", "adaptive"), "adaptive"),  # AdaKV: the heads share the budget
    # mixed precision by score: every kept token at 2 bits, the best-scored half at 4
    Preset("snapkv", ("--then_bits", "2", "--fine_share", "0.5"), "then int2 mixed"),
]
BY_NAME = {preset.name: preset for preset in PRESETS}


def default(strategy: str, option: str):
    """The library's default of a strategy's option (e.g. default("quantize_kv", "group_size"))."""
    return parse_strategy_options(strategy, [])[option]


SINK_SIZE, WINDOW_SIZE = default("compress_kv", "sink_size"), default("compress_kv", "window_size")
GROUP_SIZE = default("quantize_kv", "group_size")



def add_arguments(parser, which: str, group: bool = False):
    """--sink_size, --window_size (and with group --group_size) for `which` (e.g. "compress_kv, quantize_kv"), with
    the library's defaults."""
    parser.add_argument("--sink_size", type=whole_number(0), default=SINK_SIZE,
                        help=f"{which}: first tokens kept in the model dtype (default {SINK_SIZE}, the library's)")
    parser.add_argument("--window_size", type=whole_number(1), default=WINDOW_SIZE,
                        help=f"{which}: recent tokens kept in the model dtype (default {WINDOW_SIZE}, the library's)")
    if group:
        parser.add_argument("--group_size", type=whole_number(1), default=GROUP_SIZE,
                            help=f"{which}: KIVI group of the int4/int2 formats (default {GROUP_SIZE}, the library's)")
