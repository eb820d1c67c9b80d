#!/usr/bin/env bash
# The main job: set up, train the LSTM LM on PTB, then compare Fisher and exact-Hessian influence.
# Writes checkpoints/ptb_lstm.pt, figures/ptb_*.png, results/ptb.json and the executed notebooks
# results/*_ptb.ipynb. Extra arguments go to both papermill calls, e.g. -p device cuda.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONUNBUFFERED=1
mkdir -p results
start=$(date +%s)
.venv/bin/papermill --log-output train_lstm_penn_treebank.ipynb results/train_lstm_penn_treebank_ptb.ipynb "$@"
.venv/bin/papermill --log-output fisher_if.ipynb results/fisher_if_ptb.ipynb "$@"
echo "main job finished in $(( $(date +%s) - start )) s (after set-up); see results/ptb.json and figures/"
