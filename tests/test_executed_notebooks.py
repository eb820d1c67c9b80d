"""The executed notebooks of the default PTB run are committed (docs/notebooks/), so a reader sees every figure and
table inline without running anything; the README links them."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXECUTED = {"train_lstm_penn_treebank.ipynb": "docs/notebooks/train_lstm_penn_treebank_ptb.ipynb",
            "fisher_if.ipynb": "docs/notebooks/fisher_if_ptb.ipynb",
            "whole_network.ipynb": "docs/notebooks/whole_network_ptb.ipynb"}


@pytest.mark.parametrize("source", list(EXECUTED))
def test_executed_copy_shows_figures_inline_and_matches_the_notebook(source):
    executed = json.loads((ROOT / EXECUTED[source]).read_text())
    outputs = [o for c in executed["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert images and not errors
    assert (ROOT / EXECUTED[source]).stat().st_size < 5 * 2**20  # of reasonable size
    # same code as the committed notebook (papermill injects a parameters cell, tagged so)
    code = lambda nb: ["".join(c["source"]) for c in nb["cells"]  # noqa: E731
                       if c["cell_type"] == "code" and "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    assert code(executed) == code(json.loads((ROOT / source).read_text()))
    assert EXECUTED[source] in (ROOT / "README.md").read_text()
