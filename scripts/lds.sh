#!/usr/bin/env bash
# The LDS study of issue 15, every stage, resumable: rerun the same command after a stop and it continues.
#   bash scripts/lds.sh            (needs the PTB files: IFUTILS_DATA_DIR or data/ptb/)
# 1. the full-data model and the epoch count; 2. the removal sets (EK-FAC and gradient-dot scores of the full-data
# model); 3. the 200 subset models and the counterfactual-removal models, two processes side by side (one core
# each); 4. every method's predictions, the LDS, the removal table and the figures (results/ptb_lds.json).
# Extra arguments go to every stage (e.g. --subsets 50); the results file is named after any non-default setting.
# Not beside scripts/studies.sh, which runs the same stages (two scoring stages at once would exceed 24 GiB).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
$py experiments/lds.py --stage choose "$@"
$py experiments/lds.py --stage sets "$@"
mkdir -p logs
for shard in 0/2 1/2; do
  log="logs/lds_shard_${shard%/*}.txt"
  echo "training shard $shard in the background; follow it with: tail -f $log"
  ( $py experiments/lds.py --stage train --shard "$shard" "$@" && \
    $py experiments/lds.py --stage removals --shard "$shard" "$@" ) > "$log" 2>&1 &
done
tick=0
while [ "$(jobs -rp | wc -l)" -gt 0 ]; do  # a one-line summary every 10 minutes while the shards run
  sleep 30
  tick=$((tick + 1))
  if [ $((tick % 20)) -eq 0 ]; then
    $py experiments/lds.py --stage status "$@" 2>/dev/null | tr '\n' ' '; echo
  fi
done
wait
$py experiments/lds.py --stage score "$@"
$py experiments/lds.py --stage status "$@"
