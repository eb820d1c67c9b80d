#!/usr/bin/env bash
# Every retraining study of issues 15 and 16 on two workers (one core each), resumable: rerun the same command
# after a stop (or a kill) and it continues where it was.
#   bash scripts/studies.sh        (needs the PTB files: IFUTILS_DATA_DIR or data/ptb/; logs in logs/studies_*.txt)
# Both workers take training units from the same lists: a unit being trained holds a lock (ifutils.retrain), so
# the other worker takes the next one. Worker a only trains (a model takes about 1 GiB); worker b runs the scoring
# stages one after the other (each up to 14 GiB: never two at once on 24 GiB), then trains too:
#   a: LDS subset models -> removal models -> corrupted models -> application models (once the rankings exist)
#   b: LDS subset models -> LDS score -> detection score -> application rankings -> removal models -> application
#      models
# then the application score and the final LDS and detection scores (every cached group is read back).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
mkdir -p logs
$py experiments/lds.py --stage choose
$py experiments/lds.py --stage sets

worker_a() {
  $py experiments/lds.py --stage train
  $py experiments/lds.py --stage removals
  $py experiments/detection.py --stage train
  until ! $py experiments/applications.py --stage status | grep -q "not computed yet"; do sleep 60; done
  $py experiments/applications.py --stage train
}

worker_b() {
  $py experiments/lds.py --stage train
  $py experiments/lds.py --stage score
  $py experiments/detection.py --stage train
  $py experiments/detection.py --stage score
  $py experiments/applications.py --stage rank
  $py experiments/lds.py --stage removals
  $py experiments/applications.py --stage train
}

echo "worker a: tail -f logs/studies_a.txt; worker b: tail -f logs/studies_b.txt"
worker_a > logs/studies_a.txt 2>&1 &
a=$!
worker_b > logs/studies_b.txt 2>&1 &
b=$!
summary() {
  for stage in lds detection applications; do
    $py "experiments/$stage.py" --stage status 2>/dev/null | tail -n 2 | tr '\n' ' '
  done
  echo
}
tick=0
while kill -0 "$a" 2>/dev/null || kill -0 "$b" 2>/dev/null; do  # a one-line summary every 10 minutes
  sleep 30
  tick=$((tick + 1))
  if [ $((tick % 20)) -eq 0 ]; then date; summary; fi
done
wait "$a"
wait "$b"
$py experiments/applications.py --stage score
$py experiments/detection.py --stage score
$py experiments/lds.py --stage score
summary
