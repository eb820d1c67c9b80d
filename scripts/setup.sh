#!/usr/bin/env bash
# Create .venv (once) and install the pinned requirements and ifutils itself (editable).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# torch is pinned in requirements.txt and named again here, so no resolver step can swap it.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt torch==2.13.0 \
    2> >(grep -v "^WARNING: Location" >&2)
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . \
    2> >(grep -v "^WARNING: Location" >&2)
