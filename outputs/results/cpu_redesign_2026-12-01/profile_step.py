"""Op count and time of one eager decode step, before and after the cache redesign (run from each tree's root):

    python outputs/results/cpu_redesign_2026-12-01/profile_step.py before|after

SmolLM2-135M shape, random float32 weights, 200-token context filled with copies of one prompt, batch 1 and 8.
aten ops per step are counted with torch.profiler (10 steps); ms per step is the fastest of 10 x 10 unprofiled
steps (this shared VM's noise is one-sided: the minimum is the repeatable figure).
"""
import inspect
import json
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, ".")
sys.path.insert(0, "scripts")
import runner
from bench_decode import SHAPES  # noqa: E402
from model import Transformer  # noqa: E402

torch.manual_seed(0)
torch.set_num_threads(1)
model = Transformer(SHAPES["smollm2-135m"]).eval().requires_grad_(False)
per_sequence = "rows" in inspect.signature(Transformer.forward).parameters  # the redesign's positions are (B, 1)
rows = []
for strategy, options in [("full", {}), ("quantize_kv", {"bits": "8"}), ("quantize_kv", {"bits": "4"})]:
    for batch in (1, 8):
        runner.setup_cache(model, strategy, options, batch, 512)
        prompt = torch.randint(0, 49152, (1, 200)).expand(batch, -1).contiguous()
        with torch.no_grad():
            token = runner.prefill(model, prompt)[:, -1:].argmax(-1)

            def pos(p):
                return torch.full((batch, 1), p) if per_sequence else torch.tensor([p])

            def steps(first, n):
                nonlocal_token = token
                for p in range(first, first + n):
                    nonlocal_token = runner.decode_one_token(model, nonlocal_token, pos(p), 0.0, None)

            steps(200, 3)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                steps(203, 10)
            ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / 10
            times = []
            for r in range(10):
                t0 = time.perf_counter()
                steps(213 + 10 * r, 10)
                times.append((time.perf_counter() - t0) / 10)
        row = dict(tree=sys.argv[1], strategy=strategy, options=options, batch=batch, aten_ops_per_step=ops,
                   ms_per_step=1e3 * min(times), ms_per_step_median=1e3 * statistics.median(times))
        rows.append(row)
        print(json.dumps(row), flush=True)
