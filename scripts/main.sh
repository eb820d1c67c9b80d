#!/usr/bin/env bash
# The main job: set up, train the LSTM LM, then compare Fisher and exact-Hessian influence.
# DATASET=ptb (default) or text8. Writes checkpoints/$DATASET_lstm.pt, figures/$DATASET_*.png,
# results/$DATASET.json and the executed notebooks results/*_$DATASET.ipynb.
# Extra arguments go to both papermill calls, e.g. -p device cuda.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONUNBUFFERED=1
mkdir -p results
start=$(date +%s)
dataset="${DATASET:-ptb}"
for notebook in train_lstm_penn_treebank fisher_if; do
    .venv/bin/papermill --log-output "$notebook.ipynb" "results/${notebook}_$dataset.ipynb" -p dataset "$dataset" "$@"
done
echo "main job finished in $(( $(date +%s) - start )) s (after set-up); see results/$dataset.json and figures/"
