#!/usr/bin/env bash
# The main job: set up, train the LSTM LM, then compare Fisher and exact-Hessian influence on the default subset.
# DATASET=ptb (default) or text8. Writes checkpoints/$DATASET_lstm.pt, figures/$DATASET_*.png,
# results/$DATASET.json and the executed notebooks results/*_$DATASET.ipynb.
# Extra arguments go to both papermill calls, e.g. -p device cuda (another configuration writes under its own run
# name, so the default run's outputs are never overwritten).
# Data: downloaded (md5-checked) into data/ when online; offline, IFUTILS_DATA_DIR=<dir holding ptb/> names a copy.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh
export PYTHONUNBUFFERED=1
mkdir -p results
dataset="${DATASET:-ptb}"
for notebook in train_lstm_penn_treebank fisher_if; do
    echo "[main] $(date +%H:%M:%S) $notebook.ipynb -> results/${notebook}_$dataset.ipynb"
    .venv/bin/papermill --log-output --no-progress-bar "$notebook.ipynb" "results/${notebook}_$dataset.ipynb" \
        -p dataset "$dataset" "$@"
done
echo "[main] $(date +%H:%M:%S) finished in $(( $(date +%s) - start )) s, set-up included; see results/$dataset.json and figures/"
