# Diagnosis, 2026-12-06: which tokens of the needle each layer's KV heads hold, after the prompt and after each
# decode step, on RULER niah_single_2 at 4096 tokens (samples lost at 0.05x by a dropped or wrong last digit),
# for one configuration; one model load; run from the repo root:
#   .venv/bin/python outputs/results/cpu_goals005_4k_2026-12-06/kept.py 4,5 "tova --budget 617 --then_bits 8"
# A line after the prompt (and after any decode step that changed what is held): the answer so far, then per layer
# (0 first, "|" between layers) the three KV heads' needle as held (a digit held, '_' not), the two tokens before
# it (": " as tokenized) and the "." after it included ("~" a blank token).
# Since 2026-12-06 the code is cpu_uuid_kept_2026-12-06/kept.py's, which takes the task and the length as arguments
# (the same lines for a needle a digit a token); this runs it on niah_single_2 at 4096 tokens.
import runpy
import sys

sys.argv = [sys.argv[0], "niah_single_2", "4096", *sys.argv[1:]]
runpy.run_path("outputs/results/cpu_uuid_kept_2026-12-06/kept.py", run_name="__main__")
