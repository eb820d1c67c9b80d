"""Both notebooks, executed headless with papermill in a smoke configuration (real PTB files)."""

import json

import papermill
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    common = {"figures_dir": str(out / "figures"), "results_file": str(out / "results.json"), "device": "cpu"}
    checkpoint = str(out / "lstm.pt")
    papermill.execute_notebook(
        "train_lstm_penn_treebank.ipynb", str(out / "train.ipynb"), progress_bar=False,
        parameters={**common, "checkpoint": checkpoint, "emb_dim": 16, "hidden": 16, "epochs": 1,
                    "max_train_sentences": 400},
    )
    papermill.execute_notebook(
        "fisher_if.ipynb", str(out / "fisher.ipynb"), progress_bar=False,
        parameters={**common, "checkpoint": checkpoint, "num_coords": 24, "n_hessian": 30, "n_train": 60,
                    "n_test": 3, "mc_samples": 2},
    )
    return out


def test_notebooks_write_figures_and_results(smoke_run):
    figures = sorted(p.name for p in (smoke_run / "figures").iterdir())
    assert figures == ["ptb_correlation_vs_damping.png", "ptb_scatter.png", "ptb_spectra.png", "ptb_training.png"]
    results = json.loads((smoke_run / "results.json").read_text())
    assert results["training"]["valid_ppl"] > 1
    inf = results["influence"]
    assert (inf["p"], inf["n_hessian"], inf["n_train"], inf["n_test"]) == (24, 30, 60, 3)
    curvatures = {r["curvature"] for r in inf["agreement"]}
    assert {"Hessian", "GGN (true Fisher, closed form)", "EF", "EF (diag)", "true Fisher (MC, k=2)",
            "true Fisher (MC, k=2) (diag)", "identity"} == curvatures
    # the Hessian compared with itself is the sanity anchor of every row group
    assert all(r["spearman"] > 0.999 for r in inf["agreement"] if r["curvature"] == "Hessian")
    assert set(inf["dampings"]) == {"absolute", "relative_alphas"}
    assert "curvature: Hessian + GGN" in inf["seconds"] and "Hessian" in inf["spectra"]
