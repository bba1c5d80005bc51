"""scripts/common.py and scripts/presets.py: the one list parser, formatter, table writer and command line the
scripts share, and the one list of measured configurations (every registered strategy is in it)."""
import argparse
import shlex

import pytest

import kv_cache
from scripts.common import command_line, count, fmt, length_range, list_of, markdown_table, name_list
from scripts.presets import BY_NAME, GROUP_SIZE, PRESETS, SINK_SIZE, WINDOW_SIZE, default


def test_every_registered_strategy_is_measured():
    """A strategy registered without a preset would be measured by no script: the list names every one."""
    assert set(kv_cache.STRATEGIES) == {p.strategy for p in PRESETS}
    assert len(BY_NAME) == len(PRESETS)  # one name per entry
    for preset in PRESETS:
        options = preset.options(SINK_SIZE, WINDOW_SIZE, 128)
        kv_cache.STRATEGIES[preset.strategy].check_options(options, 1024, 64)


def test_defaults_are_the_library_s():
    options = kv_cache.STRATEGIES["quantize_kv"].Options()
    assert (SINK_SIZE, WINDOW_SIZE, GROUP_SIZE) == (options.sink_size, options.window_size, options.group_size)
    assert default("h2o", "budget") == kv_cache.STRATEGIES["h2o"].Options().budget


def test_preset_labels_and_options():
    int4 = BY_NAME["quantize_kv-int4"]
    assert int4.label(16, 32) == "quantize_kv 16/32 int4" and int4.options(4, 8)["window_size"] == 8
    assert BY_NAME["full"].strategy_argv(16, 32, 128) == []  # full takes no sinks, window or budget
    assert BY_NAME["h2o-int4"].strategy_argv(16, 32, 128) == ["--sink_size", "16", "--window_size", "32",
                                                              "--budget", "128", "--then_bits", "4"]


def test_one_list_parser():
    counts = list_of(count)
    assert counts("256,4k,32K") == [256, 4096, 32768] and counts("1, 2,") == [1, 2]
    assert list_of(empty=True)("") == [] and list_of(float)("0.1,0.5") == [0.1, 0.5]
    for bad in ("", "1,x", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="256,4k,32k"):
            counts(bad)
    assert name_list(["a", "b"])("b,a") == ["b", "a"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown c: choose from a,b"):
        name_list(["a", "b"])("a,c")
    assert length_range("16-2k") == (16, 2048)
    for bad in ("40-8", "0-4", "x", "1-2-3"):
        with pytest.raises(argparse.ArgumentTypeError, match="LOW-HIGH"):
            length_range(bad)


def test_fmt_and_table():
    assert fmt(None, ".1f") == "" and fmt(None, ".1f", empty="–") == "–"
    assert fmt(0.0012345, ".3f", 1e-3) == "1.234" and fmt(3 * 2**20, ".1f", 2**20) == "3.0" and fmt(1234, ",") == "1,234"
    assert markdown_table(["a", "b"], [[1, ""]], "legend") == ["| a | b |", "|---|---|", "| 1 |  |", "", "legend"]


def test_command_line_runs_again_as_written():
    argv = ["--out", "my folder", "--retrieval_lengths", ""]
    assert shlex.split(command_line("scripts.run_matrix", argv)) == ["python", "-m", "scripts.run_matrix", *argv]
