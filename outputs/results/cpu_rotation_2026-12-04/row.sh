# The row runner of ppl.sh, run.sh and evict.sh (sourced, with out and common set): row NAME STRATEGY OPTIONS...
# runs scripts.evaluate with the script's common options into $out/NAME.json, skipping a row whose JSON exists.
row() {
  local name=$1; shift
  [ -f "$out/$name.json" ] && { echo "skip $name"; return; }
  .venv/bin/python -m scripts.evaluate "$@" "${common[@]}" --json "$out/$name.json" 2>&1 | tail -1 | tee -a "$out/log.txt"
}
