#!/usr/bin/env bash
# Every retraining study of issues 15 and 16 on two workers (one core each), resumable: rerun the same command
# after a stop (or a kill) and it continues where it was.
#   bash scripts/studies.sh        (needs the PTB files: IFUTILS_DATA_DIR or data/ptb/; logs in logs/studies_*.txt)
# Both workers take training units from the same lists: a unit being trained holds a lock (ifutils.retrain), so
# the other worker takes the next one. Worker a only trains (a model takes about 1 GiB); worker b runs the scoring
# stages one after the other (each up to 14 GiB: never two at once on 24 GiB), then trains too:
#   a: LDS subset models -> removal models -> corrupted models -> application models (once the rankings exist)
#   b: corrupted models -> detection score -> LDS predictions (--stage score: they need only the full-data model) ->
#      application rankings -> LDS subset models -> removal models -> application models
# then the application score and the final LDS and detection scores (every cached group is read back). A stage that
# fails is logged (logs/studies_failed.txt) and its worker goes on; the script then exits 1. One instance at a time
# (logs/studies.lock). STUDIES_POLL_S, STUDIES_TICK_S: the waits between checks (tests/test_studies_script.py).
# Across sessions: every finished model's record, the LDS predictions of each method group, the applications'
# rankings (results/retrained/) and each scored corrupted model (results/ptb_detection.json) are kept in the
# repository; commit them as they come (bash scripts/keep_studies.sh) and a fresh clone skips that work. The
# checkpoints/ and cache/ folders are not kept.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
mkdir -p logs
exec 9> logs/studies.lock  # one instance at a time (its workers inherit the lock): two would score at once
flock -n 9 || { echo "scripts/studies.sh is already running (logs/studies.lock is held)"; exit 1; }
$py experiments/lds.py --stage choose
$py experiments/lds.py --stage sets
failed=logs/studies_failed.txt
echo "[studies] $(date -u +%FT%TZ) started" >> "$failed"
first=$(wc -l < "$failed")  # this run's lines of $failed start here
run() {  # one stage; a failure is logged and the worker goes on (every stage is resumable on its own)
  "$@" || { rc=$?; echo "[studies] $(date -u +%FT%TZ) FAILED (exit $rc): $*" | tee -a "$failed"; }
}
rankings_or_b_ended() {  # worker a's wait: 0 once the rankings exist (status exits 3 while they do not)
  local rc=0
  $py experiments/applications.py --stage status > /dev/null 2>&1 || rc=$?
  [ "$rc" -eq 0 ] || ! kill -0 "$1" 2>/dev/null
}

worker_b() {
  run $py experiments/detection.py --stage train
  run $py experiments/detection.py --stage score
  run $py experiments/lds.py --stage score
  run $py experiments/applications.py --stage rank
  run $py experiments/lds.py --stage train
  run $py experiments/lds.py --stage removals
  run $py experiments/applications.py --stage train
}

worker_a() {  # $1: worker b's pid (the application models wait for its rankings, or for it to end)
  run $py experiments/lds.py --stage train
  run $py experiments/lds.py --stage removals
  run $py experiments/detection.py --stage train
  until rankings_or_b_ended "$1"; do sleep "${STUDIES_POLL_S:-60}"; done
  run $py experiments/applications.py --stage train
}

echo "worker a: tail -f logs/studies_a.txt; worker b: tail -f logs/studies_b.txt"
set -m  # each worker in its own process group, so that the trap below can end a worker with its children
for w in a b; do echo "=== $(date -u +%FT%TZ) scripts/studies.sh started ===" >> "logs/studies_$w.txt"; done
worker_b >> logs/studies_b.txt 2>&1 &
b=$!
worker_a "$b" >> logs/studies_a.txt 2>&1 &
a=$!
trap 'kill -- -"$a" -"$b" 2>/dev/null || true' EXIT  # the supervisor ending (an error, a kill) ends the workers
summary() {  # never fatal: a status that fails prints nothing
  for stage in lds detection applications; do
    { $py "experiments/$stage.py" --stage status 2>/dev/null || true; } | tail -n 2 | tr '\n' ' '
  done
  echo
}
tick=0
while kill -0 "$a" 2>/dev/null || kill -0 "$b" 2>/dev/null; do  # a one-line summary every 10 minutes
  sleep "${STUDIES_TICK_S:-30}"
  tick=$((tick + 1))
  if [ $((tick % 20)) -eq 0 ]; then date; summary; fi
done
wait "$a" || true
wait "$b" || true
run $py experiments/applications.py --stage score
run $py experiments/detection.py --stage score
run $py experiments/lds.py --stage score
summary
if tail -n +"$first" "$failed" | grep -q FAILED; then
  echo "some stages failed this run (rerun to retry them): see $failed"
  exit 1
fi
