"""Op count and time of one eager decode step on the CPU, per strategy and batch: how much work a step launches
(aten ops per step, counted with torch.profiler over 10 steps) and what it costs (ms per step, the fastest of 10 x 10
unprofiled steps: a shared machine's noise is one-sided, so the minimum is the repeatable figure).

    python -m scripts.profile_step after > outputs/local/profile_after.jsonl      # LABEL names the tree measured

SmolLM2-135M's shape with random float32 weights (shapes.py), one thread, a 200-token context filled with copies of
one prompt, batch 1 and 8; one JSON line per row. Run it in two checkouts (before and after a change) to compare
them: outputs/results/cpu_redesign_2026-12-01/ holds such a pair, made by an earlier version of this file.
"""
import argparse
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from profiling import quiet_profiler_logs
from runner import decode_one_token, prefill, setup_cache
from scripts.presets import BY_NAME
from shapes import SHAPES, random_model

PRESETS = ("full", "quantize_kv-int8", "quantize_kv-int4")
CONTEXT, BATCHES = 200, (1, 8)


@torch.no_grad()
def profile_row(model, preset: str, batch: int, label: str) -> dict:
    setup_cache(model, BY_NAME[preset].strategy, BY_NAME[preset].options(), batch, 512)
    prompt = torch.randint(0, model.args.vocab_size, (1, CONTEXT)).expand(batch, -1).contiguous()
    token = prefill(model, prompt, last_only=True).argmax(-1)

    def steps(first, n):
        current = token
        for position in range(first, first + n):
            current = decode_one_token(model, current, torch.full((batch, 1), position))

    steps(CONTEXT, 3)
    prof = profile(activities=[ProfilerActivity.CPU])
    with quiet_profiler_logs():  # Kineto's own log lines stay out of the JSON lines
        prof.start()
    steps(CONTEXT + 3, 10)
    with quiet_profiler_logs():
        prof.stop()
    ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / 10
    times = []
    for r in range(10):
        t0 = time.perf_counter()
        steps(CONTEXT + 13 + 10 * r, 10)
        times.append((time.perf_counter() - t0) / 10)
    return dict(tree=label, strategy=BY_NAME[preset].strategy, options=BY_NAME[preset].options(), batch=batch,
                aten_ops_per_step=ops, ms_per_step=1e3 * min(times), ms_per_step_median=1e3 * statistics.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m scripts.profile_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("label", help="names the tree measured in every row (e.g. before, after)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = random_model(SHAPES["smollm2-135m"], torch.device("cpu"), torch.float32)
    for preset in PRESETS:
        for batch in BATCHES:
            print(json.dumps(profile_row(model, preset, batch, args.label)), flush=True)


if __name__ == "__main__":
    main()
