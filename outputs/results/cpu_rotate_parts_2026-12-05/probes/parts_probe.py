"""Probe (2026-12-05, code of 11ef4e4, before --rotate_parts existed): rotate only the keys (ROT_WHICH=k: q and k
rotated, v and the output not) or only the values (ROT_WHICH=v) by monkeypatching the caches' rotation calls; run
from the repository root with PYTHONPATH=. and scripts.evaluate's arguments with --rotate hadamard. The option
--rotate_parts now does the keys-only case (run.sh)."""
import os, sys, runpy
import kv_cache.quantize_kv as QK
from kv_cache.rotation import rotated
which = os.environ["ROT_WHICH"]  # "v" or "k"
def part(q, k, v, r):
    if which == "v":
        return q, k, rotated(v, r)
    return rotated(q, r), rotated(k, r), v
import kv_cache.evict as EV
orig = QK.rotated
for M in (QK, EV):
    M.rotated_qkv = part
    M.rotated = lambda x, r, inverse=False: orig(x, r, inverse) if which == "v" else x
sys.argv = ["scripts.evaluate"] + sys.argv[1:]
runpy.run_module("scripts.evaluate", run_name="__main__")
