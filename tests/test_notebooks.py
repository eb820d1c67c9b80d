"""Both notebooks, executed headless with papermill in a smoke configuration, on PTB and on the
text8-format sample (a single parameter change)."""

import json

import papermill
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
LABELS = {"ptb": "ptb", "text8": "text8-format sample"}


@pytest.fixture(scope="module", params=list(LABELS))
def smoke_run(request, tmp_path_factory):
    dataset = request.param
    out = tmp_path_factory.mktemp(f"smoke_{dataset}")
    common = {"dataset": dataset, "figures_dir": str(out / "figures"), "results_file": str(out / "results.json"),
              "checkpoint": str(out / "lstm.pt"), "device": "cpu",
              "run_name": dataset}  # outputs named <dataset>_*, in the given places
    papermill.execute_notebook(
        "train_lstm_penn_treebank.ipynb", str(out / "train.ipynb"), progress_bar=False,
        parameters={**common, "emb_dim": 16, "hidden": 16, "epochs": 1, "max_train_sentences": 400},
    )
    papermill.execute_notebook(
        "fisher_if.ipynb", str(out / "fisher.ipynb"), progress_bar=False,
        parameters={**common, "num_coords": 24, "n_hessian": 20, "n_train": 60, "n_test": 3, "mc_samples": 2,
                    "mc_error_ks": [1, 2], "arnoldi_rank": 8, "lissa_depth": 300, "ground_truth": True, "gt_n": 16, "gt_damping": 0.05,
                    "gt_loo": 6, "gt_groups": 4, "gt_group_size": 3, "gt_lds_subsets": 6, "gt_fd_samples": 1},
    )
    return dataset, out


def test_notebooks_write_figures_and_results(smoke_run):
    dataset, out = smoke_run
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == [f"{dataset}_{name}.png"
                       for name in ("correlation_vs_damping", "mc_fisher_error", "retraining_scatter", "retraining_vs_damping",
                                  "scatter", "spectra", "training")]
    results = json.loads((out / "results.json").read_text())
    assert results["training"]["valid_ppl"] > 1
    assert results["training"]["data_label"] == results["influence"]["data_label"] == LABELS[dataset]
    inf = results["influence"]
    assert (inf["p"], inf["n_hessian"], inf["n_train"], inf["n_test"]) == (24, 20, 60, 3)
    curvatures = {r["curvature"] for r in inf["agreement"]}
    assert curvatures == {
        "hessian", "ggn", "mc_fisher_k2", "ef", "ef_token", "hessian_diag", "ggn_diag", "ef_diag", "kfac", "ekfac",
        "ef_woodbury", "arnoldi_r8", "arnoldi_r8_complement", "hessian_cg", "hessian_lissa", "ef_datainf", "identity",
        "cosine"}
    assert [e["curvature"] for e in inf["comparison"]] == list(dict.fromkeys(r["curvature"] for r in inf["agreement"]))
    for entry in inf["comparison"]:
        assert {"pearson", "spearman", "top_frac_harmful", "top_frac_helpful"} <= set(entry["best"])
        assert entry["default"] is not None
    assert set(inf["mc_fisher_error"]) == {"1", "2"}
    assert set(inf["detection"]) == {"gradient L1 norm", "gradient L2 norm", "isolation forest"}
    # the Hessian compared with itself is the sanity anchor of every row group
    assert all(r["spearman"] > 0.999 for r in inf["agreement"] if r["curvature"] == "hessian")
    assert set(inf["dampings"]) == {"absolute", "relative_alphas"}
    assert "curvature: Hessian + GGN + EF (token)" in inf["seconds"] and "hessian" in inf["spectra"]
    gt = results["ground_truth"]
    assert gt["reference_solve"]["grad_norm"] <= gt["config"]["tol"] and len(gt["loo_samples"]) == 6
    exact = gt["agreement"]["hessian"]
    assert exact["leave-one-out"]["pearson"] > 0.9 and set(exact) == {"leave-one-out", "leave-k-out", "LDS"}
    assert exact["leave-k-out"]["pearson"] > 0.9 and exact["LDS"]["spearman"] > 0.5
    assert all(r["relative_error"] < 1e-2 for r in gt["finite_differences"])


def test_figures_are_labelled_with_the_data(smoke_run):
    dataset, out = smoke_run
    executed = json.loads((out / "fisher.ipynb").read_text())
    text = json.dumps(executed["cells"])
    assert LABELS[dataset] in text
