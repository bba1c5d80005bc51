# gguf_file.open_gguf against gguf.GGUFReader on the embedded SmolLM2 GGUF: seconds to open (parse every metadata
# field and map every tensor), best of 3 each, alternated, in one run; run from the repo root:
#   .venv/bin/python outputs/results/cpu_gguf_read_2026-12-06/read_time.py
import platform
from importlib.metadata import version
import sys
import time
from datetime import date

sys.path.insert(0, ".")
import gguf  # noqa: E402

from gguf_file import open_gguf  # noqa: E402
from scripts.compare_peers import gguf_path  # noqa: E402

path = gguf_path()
times = {"gguf.GGUFReader": [], "gguf_file.open_gguf": []}
for _ in range(3):
    for name, open_ in (("gguf.GGUFReader", lambda: gguf.GGUFReader(str(path))), ("gguf_file.open_gguf",
                                                                                   lambda: open_gguf(path))):
        start = time.perf_counter()
        open_()
        times[name].append(time.perf_counter() - start)
best = {name: min(t) for name, t in times.items()}
print(f"{date.today()} {platform.machine()} CPU, gguf {version('gguf')}, {path.name}")
for name, t in best.items():
    print(f"{name}: {t:.2f} s (best of 3: {', '.join(f'{x:.2f}' for x in times[name])})")
print(f"open_gguf / GGUFReader: {best['gguf_file.open_gguf'] / best['gguf.GGUFReader']:.3f}")
