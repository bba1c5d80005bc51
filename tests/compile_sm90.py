"""Compile the Triton kernels for an H100 (sm_90) without a GPU, and check the machine code for what the CPU
interpreter cannot show. Run by tests/test_kernels.py in a subprocess (the kernels must not be in interpreter mode):

    python tests/compile_sm90.py      # prints one line per kernel configuration; exit 1 on a failed check
"""
import os
import re
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 3.6 fuses by default too
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import decode_attention, quantize_append  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
WARPS, STAGES = decode_attention.DEFAULT_WARPS, decode_attention.DEFAULT_STAGES  # the launch defaults


def compile_ptx(fn, types: dict, constexprs: dict, **options) -> str:
    """PTX of fn with pointer/float argument types from `types` (other runtime arguments i32). Pointers and strides
    get the divisibility-by-16 hint Triton gives them at launch for 16-byte-aligned tensors."""
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    aligned = [n for n in fn.arg_names if n not in constexprs and (n.endswith("_ptr") or n.startswith("stride"))]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options).asm["ptx"]


def check(name: str, ptx: str, *patterns: str, absent: tuple = ()):
    missing = [p for p in patterns if not re.search(p, ptx)]
    present = [p for p in absent if re.search(p, ptx)]
    print(f"{name}: {'ok' if not missing and not present else 'FAILED'}"
          + "".join(f"; missing {p!r}" for p in missing) + "".join(f"; found {p!r}" for p in present))
    return not missing and not present


def main() -> int:
    ok = True
    split = decode_attention._decode_split_kernel
    payloads = {"int8": ("i8", 1), "fp8": ("fp8e4nv", 1), "int4": ("u8", 2), "int2": ("u8", 4)}
    for kind, (payload, per_byte) in payloads.items():
        asym = per_byte > 1  # KIVI: keys per channel (32 tokens), values per token in groups of 32 channels
        types = dict(q_ptr="*bf16", recent_k_ptr="*bf16", recent_v_ptr="*bf16", recent_pos_ptr="*i64", recent_last_ptr="*i64",
                     n_older_ptr="*i64", kq_ptr=f"*{payload}", vq_ptr=f"*{payload}", ks_ptr="*fp16", kz_ptr="*fp16",
                     vs_ptr="*fp16", vz_ptr="*fp16", o_part_ptr="*fp32", lse_part_ptr="*fp32", qk_scale="fp32",
                     recent_table_ptr="*i32", older_table_ptr="*i32", scores_ptr="*fp32", rope_cos_ptr="*fp32",
                     rope_sin_ptr="*fp32", older_start_ptr="*i64", klo_ptr="*u8", vlo_ptr="*u8", fine_ptr="*i16")
        # Contiguous; the older store read through a block table of 32-token pages; keys quantized before RoPE,
        # each dequantized tile rotated in registers; head-shared (the eviction stores' head-adaptive runs: keys per
        # token, paged, with scores); 2-bit in planes (mixed precision by score: per-token keys, paged, with scores).
        configs = [(False, False, False, False), (True, False, False, False), (False, True, False, False),
                   (True, False, True, False)] + [(True, False, False, True)] * (per_byte == 4)
        for paged, rope, start, planes in configs:
            per_channel = asym and not (start or planes)
            constexprs = dict(H=3, GROUP=3, D=64, HAS_HI_POS=True, HAS_HI_LAST=False, HAS_MID=True, SPLITS_MID=40,
                              SPLITS_HI=2, K_PER_BYTE=per_byte, K_F=32 if per_channel else 1,
                              K_G=(1 if per_channel else 32) if asym else 64,
                              K_ZERO=asym, K_TILES=True, V_PER_BYTE=per_byte, V_F=1, V_G=32 if asym else 64,
                              V_ZERO=asym, V_TILES=True, BLOCK_G=16, BLOCK_N=64, BLOCK_D=64, DOT_PRECISION="tf32",
                              PAGED_HI=False, HI_BLOCK=1, PAGED_MID=paged, MID_BLOCK=32 if paged else 1,
                              SCORES=start or planes, KEY_ROPE=rope, HAS_START=start, HAS_LO=planes)
            ptx = compile_ptx(split, types, constexprs, num_warps=WARPS, num_stages=STAGES)
            # Tensor-core dots, and the tiles fetched 16 bytes at a time (asynchronously, pipelined).
            what = (" in planes paged" if planes else " head-shared paged" if start else " paged" if paged
                    else " pre-RoPE keys" if rope else "")
            ok &= check(f"decode split, {kind} older{what}, bf16 model", ptx, r"mma\.sync",
                        r"cp\.async\.c[ag]\.shared\.global.*0x10,")
    # The full cache (no older store: its pointers are dummies in the model dtype, HAS_MID off), plain and paged.
    # Its dead older-store branch once broke Triton 3.6's coalescing pass on sm_90 (the H200's image), not 3.9's.
    for paged in (False, True):
        types = dict(q_ptr="*bf16", recent_k_ptr="*bf16", recent_v_ptr="*bf16", recent_last_ptr="*i64",
                     o_part_ptr="*fp32", lse_part_ptr="*fp32", qk_scale="fp32", recent_table_ptr="*i32")
        types.update((name, "*bf16") for name in split.arg_names if name.endswith("_ptr") and name not in types)
        constexprs = dict(H=8, GROUP=4, D=128, HAS_HI_POS=False, HAS_HI_LAST=True, HAS_MID=False, SPLITS_MID=0,
                          SPLITS_HI=33, K_PER_BYTE=1, K_F=1, K_G=1, K_ZERO=False, K_TILES=True, V_PER_BYTE=1, V_F=1,
                          V_G=1, V_ZERO=False, V_TILES=True, BLOCK_G=16, BLOCK_N=64, BLOCK_D=128, DOT_PRECISION="tf32",
                          PAGED_HI=paged, HI_BLOCK=16 if paged else 1, PAGED_MID=False, MID_BLOCK=1, SCORES=False,
                          KEY_ROPE=False, HAS_START=False, HAS_LO=False)
        ptx = compile_ptx(split, types, constexprs, num_warps=WARPS, num_stages=STAGES)
        ok &= check(f"decode split, full cache{' paged' if paged else ''}, bf16 model", ptx, r"mma\.sync",
                    r"cp\.async\.c[ag]\.shared\.global.*0x10,")
    # tune_decode's "bf16 dots": bfloat16 tensor-core dots (not tf32) over the same tiles
    ptx = compile_ptx(split, types, dict(constexprs, DOT_PRECISION="bf16"), num_warps=WARPS, num_stages=STAGES)
    ok &= check("decode split, full cache paged, bf16 dots", ptx, r"mma\.sync\.aligned\.\w+\.row\.col\.f32\.bf16\.bf16",
                absent=(r"\.tf32",))
    ptx = compile_ptx(decode_attention._decode_merge_kernel,
                      dict(o_part_ptr="*fp32", lse_part_ptr="*fp32", out_ptr="*bf16"),
                      dict(HQ=9, D=64, SPLITS=88, BLOCK_S=128, CHUNK_S=16, BLOCK_D=64), num_warps=2)
    ok &= check("decode merge", ptx, r"ld\.global(\.\w+)*\.v4")
    for kind, (payload, per_byte) in payloads.items():
        asym = per_byte > 1
        types = dict(k_ptr="*bf16", v_ptr="*bf16", rows_ptr="*i64", start_ptr="*i64", kq_ptr=f"*{payload}",
                     vq_ptr=f"*{payload}", ks_ptr="*fp16", kz_ptr="*fp16", vs_ptr="*fp16", vz_ptr="*fp16")
        constexprs = dict(H=3, D=64, K_PER_BYTE=per_byte, K_F=32 if asym else 1, K_G=1 if asym else 64,
                          V_PER_BYTE=per_byte, V_F=1, V_G=32 if asym else 64, ASYM=asym, FP8=kind == "fp8",
                          BLOCK_T=32 if asym else 1)
        ptx = compile_ptx(quantize_append._quantize_kv_kernel, types, constexprs, num_warps=4,
                          enable_fp_fusion=False)
        # Bit-exact with the PyTorch reference needs IEEE division and no fused multiply-add before rounding.
        ok &= check(f"quantize on append, {kind}", ptx, r"div\.rn\.f32",
                    absent=(r"div\.(full|approx)\.f32", r"fma\.rn\.f32"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
