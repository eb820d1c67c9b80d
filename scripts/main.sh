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
# Settings other than the defaults (anything but "-p device X") name their own run, passed to both notebooks, so the
# comparison scores the model this run trained and nothing overwrites the default run's files.
run="$dataset"
extra=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    if [ "${args[i]}" = "-p" ] && [ "${args[i+1]:-}" = "device" ]; then i=$((i + 2)); continue; fi
    extra+=("${args[i]}")
done
named=()
if [ ${#extra[@]} -gt 0 ]; then
    if printf '%s\n' "$@" | grep -qx "run_name"; then
        run=$(printf '%s\n' "$@" | grep -A1 -x "run_name" | tail -1)
    else
        run="${dataset}_$(printf '%s ' "${extra[@]}" | sha256sum | cut -c1-8)"
        named=(-p run_name "$run")
    fi
fi
for notebook in train_lstm_penn_treebank fisher_if; do
    echo "[main] $(date +%H:%M:%S) $notebook.ipynb (run $run) -> results/${notebook}_$run.ipynb"
    .venv/bin/papermill --log-output --no-progress-bar "$notebook.ipynb" "results/${notebook}_$run.ipynb" \
        -p dataset "$dataset" "${named[@]}" "$@"
done
echo "[main] $(date +%H:%M:%S) finished in $(( $(date +%s) - start )) s, set-up included; see results/$run.json and figures/${run}_*.png"
