#!/usr/bin/env bash
# Create .venv (once) and install the pinned requirements and ifutils itself (editable).
# pip prints what it collects and installs (a line per package), so a first set-up shows its progress.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "[setup] $(date +%H:%M:%S) virtual environment .venv"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
quiet() { grep -v -e "^Requirement already satisfied" -e "^WARNING: Location" || true; }
# torch is pinned in requirements.txt and named again here, so no resolver step can swap it.
.venv/bin/python -m pip install --disable-pip-version-check --progress-bar off -r requirements.txt torch==2.13.0 2>&1 | quiet
.venv/bin/python -m pip install --disable-pip-version-check --progress-bar off --no-deps --no-build-isolation -e . 2>&1 | quiet
echo "[setup] $(date +%H:%M:%S) done"
