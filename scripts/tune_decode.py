"""The fused decode-attention kernel's launch settings, tried on a GPU: tile, warps, pipeline stages and splits per
format and batch at one long context, each timed as bench_decode's kernel rows are (one layer of the Llama-3-8B shape,
replayed as a CUDA graph, L2 cleared), and each variant's output checked against the defaults' on the same inputs.

    python -m scripts.tune_decode OUT_DIR                  # a GPU: <= 2 minutes (--budget_s 120)
    python -m scripts.tune_decode OUT_DIR --tiny           # CPU rehearsal: Triton interpreter, tiny shapes

Why: the first H200 run (outputs/results/gpu_2026-12-04/) read int8 at 39 % and int4 at 13 % of the copy bandwidth at
32k x 8, and the split count of the defaults (kernels/decode_attention._num_splits: 2 x SMs programs, rounded up) puts
a second, mostly empty wave on the chip when ~200 registers allow two programs per SM, and 4/2-bit tiles look bound
by instructions (dequantization, float32 operands through shared memory for tf32 dots) rather than bytes. The table says which settings
to make the defaults (decode_attention.DEFAULT_WARPS / DEFAULT_STAGES, _num_splits, the block_n rule). OUT_DIR gets
tune_decode.md and .json, rewritten after every row.
"""
import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

if "--tiny" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, on a machine with a GPU too
from atomic import atomic_write_json, atomic_write_text
from scripts import bench_decode  # sets TRITON_INTERPRET without a GPU, before triton loads
from scripts.common import copy_bandwidth, fmt, header_lines, markdown_table, run_header
from scripts.presets import SINK_SIZE, WINDOW_SIZE
from shapes import SHAPES

KINDS = ("int8", "int4", "bf16", "int2")  # the quantized formats first: theirs is the gap the first run showed
TINY_VARIANTS = ("defaults", "block_n 32", "bf16 dots")  # the rehearsal's: tiles and the dots' operands
TOL = 2e-2  # ||variant - defaults|| / ||defaults||: the same function in another summation order, bf16 output


def variants(kind: str, batch: int, n_kv_head: int, n_sm: int) -> list[tuple[str, dict]]:
    """(name, decode_attention arguments) to try; the first is the defaults. Splits (the count of programs per
    sequence and KV head): the store the context lives in gets all but the recent store's one; "one wave" = two
    programs per SM (as ~200 registers allow the quantized kernels; it may equal the defaults' count)."""
    one_wave = max(2, 2 * n_sm // (batch * n_kv_head))  # splits in all (the recent store's one included)
    splits = (lambda n: (0, n)) if kind == "bf16" else (lambda n: (n - 1, 1))
    return [("defaults", {}), ("block_n 128", dict(block_n=128)), ("block_n 32", dict(block_n=32)),
            ("8 warps", dict(num_warps=8)), ("3 stages", dict(num_stages=3)), ("4 stages", dict(num_stages=4)),
            ("block_n 128, 8 warps, 3 stages", dict(block_n=128, num_warps=8, num_stages=3)),
            ("bf16 dots", dict(dot_precision="bf16")),
            ("bf16 dots, block_n 128, 8 warps, 3 stages", dict(dot_precision="bf16", block_n=128, num_warps=8,
                                                               num_stages=3)),
            (f"splits {one_wave} (one wave)", dict(splits=splits(one_wave))),
            (f"splits {2 * one_wave}", dict(splits=splits(2 * one_wave)))]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m scripts.tune_decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder for tune_decode.md and .json")
    p.add_argument("--tiny", action="store_true", help="CPU rehearsal: Triton interpreter, tiny shapes")
    p.add_argument("--budget_s", type=float, default=120.0, help="stop starting rows after this (default 120)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("error: no GPU here: pass --tiny for the CPU rehearsal")
    if not args.tiny and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("error: TRITON_INTERPRET is set: unset it, or pass --tiny (the real shapes would take hours)")
    if not math.isfinite(args.budget_s) or args.budget_s <= 0:
        sys.exit("error: --budget_s must be a number of seconds > 0")
    if args.out.exists() and not args.out.is_dir():
        sys.exit(f"error: {args.out} is a file: give a folder for the results")
    args.out.mkdir(parents=True, exist_ok=True)
    from kernels.decode_attention import decode_attention

    device = torch.device("cpu" if args.tiny else "cuda")
    shape, context, batches = ("tiny", 150, (2,)) if args.tiny else ("llama3-8b", 32768, (8, 1))
    n_sm = 2 if args.tiny else torch.cuda.get_device_properties(device).multi_processor_count
    header = run_header(device, "scripts.tune_decode", sys.argv[1:] if argv is None else argv)
    header.update(shape=shape, context=context, bandwidth=copy_bandwidth(device), budget_s=args.budget_s)
    cfg = dict(bandwidth=header["bandwidth"], sink_size=SINK_SIZE, window_size=WINDOW_SIZE)
    t0, rows = time.time(), []
    for kind in KINDS[:2] if args.tiny else KINDS:  # each format at both batches, in order of value
        for batch in batches:
            reference, case = None, None
            for name, variant in variants(kind, batch, SHAPES[shape].n_kv_head, n_sm):
                if args.tiny and name not in TINY_VARIANTS:
                    continue
                if time.time() - t0 > args.budget_s:
                    rows.append(dict(kind=kind, batch=batch, name=name, note="skipped: time budget spent"))
                    continue
                try:  # one (kind, batch)'s inputs for all its variants, built once
                    case = case or bench_decode.seeded_kernel_case(kind, shape, batch, context, cfg, device)
                    row = dict(name=name, **bench_decode.bench_kernel_row(decode_attention, shape, kind, context,
                                                                          batch, cfg, device, variant, case))
                    if "seconds" in row:
                        out = decode_attention(**case[0], **variant).float()
                        reference = out if reference is None else reference
                        row["rel_err"] = float((out - reference).norm() / reference.norm())
                        if not row["rel_err"] <= TOL:  # NaN fails too
                            row["note"] = f"FAIL: output differs from the defaults' by {row['rel_err']:.1e}"
                except Exception as e:  # a setting the compiler or the GPU refuses: recorded, the others still run
                    row = dict(kind=kind, batch=batch, name=name, note=f"error: {type(e).__name__}: {e}"[:200])
                rows.append(row)
                print(f"{kind} b{batch} {name}: {fmt(row.get('seconds'), '.1f', 1e-6)} us "
                      f"({fmt(row.get('copy_pct'), '.1f')} % copy) err {fmt(row.get('rel_err'), '.1e')} {row['note']}",
                      flush=True)
                write(args.out, header, rows)
    write(args.out, header, rows, finished=True)
    print((args.out / "tune_decode.md").read_text())
    return 1 if any(r["note"].startswith(("FAIL", "error")) for r in rows) else 0


def write(out: Path, header: dict, rows: list[dict], finished: bool = False):
    header = dict(header, finished=finished)
    atomic_write_json(out / "tune_decode.json", dict(header, rows=rows), indent=1, default=str)
    best = {}
    for r in rows:
        if "seconds" in r and not r["note"]:
            key = (r["kind"], r["batch"])
            best[key] = min(best.get(key, r), r, key=lambda x: x["seconds"])
    defaults = {(r["kind"], r["batch"]): r for r in rows if r["name"] == "defaults" and "seconds" in r}
    table = markdown_table(
        ["kind", "batch", "variant", "us", "GB/s", "% copy", "vs defaults", "rel err", "note"],
        [[r["kind"], r["batch"], r["name"] + (" **(best)**" if best.get((r["kind"], r["batch"])) is r else ""),
          fmt(r.get("seconds"), ".1f", 1e-6), fmt(r.get("bytes_per_s"), ".0f", 1e9), fmt(r.get("copy_pct"), ".1f"),
          fmt(defaults[(r["kind"], r["batch"])]["seconds"] / r["seconds"] if "seconds" in r
              and (r["kind"], r["batch"]) in defaults else None, ".2f"), fmt(r.get("rel_err"), ".1e"), r["note"]]
         for r in rows],
        legend="**vs defaults** = the defaults' time over this variant's (above 1: faster). **rel err** = "
               "||out - defaults' out|| / ||defaults' out|| on the same inputs. One layer's fused decode attention, "
               "timed as a CUDA graph replay with L2 cleared (median; --tiny: the interpreter, host clock).")
    atomic_write_text(out / "tune_decode.md", "\n".join(["# decode-attention launch settings", "",
                                                         *header_lines(header), "", *table, ""]))


if __name__ == "__main__":
    sys.exit(main())
