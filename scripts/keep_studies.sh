#!/usr/bin/env bash
# Commit what the running studies have finished so far, so that a fresh clone (a new machine) does not redo it:
# every archived model record, removal set, LDS method group and ranking (results/retrained/), the scored corrupted
# models (results/ptb_detection.json), and docs/results.md regenerated from them (tests/test_docs.py checks it).
#   bash scripts/keep_studies.sh        (every half hour while scripts/studies.sh runs, and before a session ends)
# Prints what it committed, or that there was nothing new. Never touches other uncommitted changes.
set -euo pipefail
cd "$(dirname "$0")/.."
paths=(results/retrained)
[ -f results/ptb_detection.json ] && paths+=(results/ptb_detection.json)
git add -- "${paths[@]}"
if git diff --cached --quiet -- "${paths[@]}"; then
  echo "[keep] nothing new to commit"
  exit 0
fi
.venv/bin/python experiments/report.py
git add docs/results.md
records=$(git diff --cached --name-only -- results/retrained | grep -c '\.json\.gz$' || true)
git commit -q -m "studies: new model records ($records) and the scored results so far" -- "${paths[@]}" docs/results.md
echo "[keep] committed $(git log -1 --format=%h): new model records: $records"
