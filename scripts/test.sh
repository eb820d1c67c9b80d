#!/usr/bin/env bash
# The test command: set up, then run the whole suite (notebooks included, in a smoke configuration).
# Needs the PTB files: $IFUTILS_DATA_DIR/ptb/ or data/ptb/ (downloaded when online).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
