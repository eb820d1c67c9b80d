#!/usr/bin/env bash
# Trains the PTB models of the robustness study, with the main model's settings (train_lstm_penn_treebank.ipynb
# defaults: 1 layer, dropout 0.25, 5 epochs, batch 32, lr 2e-3, clip 1) and a checkpoint per epoch kept
# (<checkpoint>_epoch<k>.pt):
#   widths 64 and 128, seed 0, embedding = hidden -> checkpoints/ptb_lstm_h{64,128}.pt
#   width 256, seeds 1 and 2                      -> checkpoints/ptb_lstm_s{1,2}.pt
# Each run resumes from its checkpoint (a finished one is only loaded), so rerun after a kill.
# Usage: IFUTILS_DATA_DIR=../shared/data bash experiments/train_family.sh [device]   (device: auto, cpu, cuda)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
train() {  # width seed checkpoint
    .venv/bin/python - "$1" "$2" "$3" "${DEVICE:-auto}" <<'PY'
import sys
from ifutils.data import load_corpus
from ifutils.io import project_path, resolve_device
from ifutils.model import ModelConfig
from ifutils.train import TrainConfig, train_language_model

width, seed, checkpoint, device = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
corpus = load_corpus("ptb")
_, history = train_language_model(corpus, ModelConfig(len(corpus.vocab), width, width, 1, 0.25),
                                  TrainConfig(epochs=5, batch_size=32, lr=2e-3, seed=seed, keep_epochs=True),
                                  project_path(checkpoint), resolve_device(device))
print(f"{checkpoint}: width {width}, seed {seed}, valid ppl {history[-1]['valid_ppl']:.1f}, "
      f"{sum(h['seconds'] for h in history) / 60:.1f} min of training")
PY
}
DEVICE="${1:-auto}"
train 64 0 checkpoints/ptb_lstm_h64.pt
train 128 0 checkpoints/ptb_lstm_h128.pt
train 256 1 checkpoints/ptb_lstm_s1.pt
train 256 2 checkpoints/ptb_lstm_s2.pt
