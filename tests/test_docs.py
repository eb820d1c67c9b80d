"""The documentation: docs/results.md is generated from results/*.json and current, the README is short and says how
to regenerate it, the docs files exist, and the generator renders known numbers into the right table cells."""

import json
from pathlib import Path

import pytest

from ifutils.experiments.report import (
    REGENERATE,
    display,
    results_markdown,
    write_results_md,
)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["docs/results.md", "docs/method.md", "docs/failure-modes.md", "docs/findings.md", "experiments/README.md",
        "tests/README.md", "benchmarks/README.md"]


def test_results_md_is_current():
    committed = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    assert committed == results_markdown(ROOT / "results", tracked_only=True), (
        f"docs/results.md is out of date with results/*.json: run `{REGENERATE}` and commit docs/results.md")


def test_readme_is_short_and_names_the_regeneration_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200, f"README.md has {len(readme.splitlines())} lines; move detail into docs/"
    assert REGENERATE in readme and "bash scripts/main.sh" in readme and "bash scripts/test.sh" in readme
    for doc in DOCS:
        if doc != "tests/README.md":
            assert doc in readme, f"README.md does not link {doc}"


@pytest.mark.parametrize("doc", DOCS)
def test_docs_files_exist_and_use_the_new_entry_points(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    assert text.strip(), f"{doc} is empty"
    for study in ("ground_truth", "robustness", "retrain_check", "spectrum"):
        assert f"scripts/{study}.py" not in text, f"{doc} still names scripts/{study}.py; it is experiments/{study}.py"


def _synthetic(root: Path) -> None:
    """Results files with known numbers, curvatures named by key ("ggn") in one and by label in another."""
    agreement = {"leave-one-out": {"pearson": 0.8125, "pearson_ci": [0.75, 0.875], "spearman": 0.5, "spearman_ci": [0.25, 0.625]},
                 "leave-k-out": {"pearson": 0.375, "pearson_ci": [0.25, 0.5]},
                 "LDS": {"spearman": 0.0625, "spearman_ci": [0.0, 0.125]}}
    gt = {"config": {"n": 7, "damping": 0.002, "n_loo": 3, "n_groups": 2, "group_size": 4, "lds_subsets": 5,
                     "lds_fraction": 0.5, "tol": 1e-11, "lds_tol": 1e-9, "bootstrap": 10},
          "reference_solve": {"iterations": 4, "hessian_evaluations": 1, "grad_norm": 3e-12, "distance_from_trained": 0.5},
          "noise_floor": {"max_abs": 2e-11, "median_abs_loo": 4e-5, "fraction_loo_below_floor": 0.0, "lds_floor": 2e-11,
                          "median_abs_lds": 1e-3},
          "finite_differences": [{"eps": 0.1, "relative_error": 2e-6}, {"eps": 0.1, "relative_error": 8e-6}],
          "agreement": {"ggn": agreement, "Hessian": {"error": "re-solve failed"}}}
    entry = {"curvature": "ekfac", "best": {"mode": "relative", "value": 10.0, "pearson": 0.5, "spearman": 0.4375,
                                             "top_frac_harmful": 0.25, "top_frac_helpful": 0.75},
             "default": {"pearson": 0.1875, "spearman": 0.3125, "top_frac_harmful": 0.5, "top_frac_helpful": 0.25},
             "build_seconds": 12.25, "shared_with": ["kfac"], "bytes": 3 * 2**20}
    influence = {"dataset": "ptb", "data_label": "ptb", "config": {"subset": "recurrent", "default_damping": 1e-4},
                 "p": 8, "n_hessian": 5, "n_train": 6, "n_test": 2, "comparison": [entry],
                 "mc_fisher_error": {"1": 2.5, "4": 0.625}}
    (root / "toy.json").write_text(json.dumps({"training": {"data_label": "toy corpus", "valid_ppl": 123.456,
                                                            "test_ppl": 98.7, "history": [{}, {}],
                                                            "seconds": {"training (all epochs)": 61.0}},
                                               "influence": influence, "ground_truth": gt}))
    retrain = {"n_removed": 50, "damping": 1e-4, "config": {"seeds": [0, 1]},
               "full": {"valid": {"mean": 500.0}}, "noise_floor": {"valid": 4.0},
               "methods": {"GGN": {"valid": {"per_seed": {"0": 10.0, "1": 14.0}, "mean": 12.0, "std": 2.0}},
                           "random": {"valid": {"per_seed": {"0": 30.0, "1": 20.0}, "mean": 25.0, "std": 5.0}}}}
    (root / "retrain_check.json").write_text(json.dumps(retrain))


def test_generator_renders_known_numbers_into_their_cells(tmp_path):
    _synthetic(tmp_path)
    text = results_markdown(tmp_path)
    assert "| `toy.json` | toy corpus | 123.5 | 98.7 | 2 | 61 |" in text
    # comparison: default Pearson, Spearman, mean top-10% (0.5 + 0.25) / 2; best with its relative damping; shared pass
    assert "| EK-FAC | 0.188 | 0.312 | 0.375 | 0.438 (α=10) | 0.500 | 12.2* | 3.00 MiB |" in text
    # a key is shown by its label, a failed row keeps its reason
    assert ("| GGN (true Fisher, closed form) | 0.812 [0.750, 0.875] | 0.500 [0.250, 0.625] | 0.375 [0.250, 0.500] "
            "| 0.062 [0.000, 0.125] |") in text
    assert "| Hessian | re-solve failed |" in text
    assert "| 0.1 | 2 | 2.0e-06 | 8.0e-06 |" in text
    assert "| error | 2.500 | 0.625 |" in text
    # retraining: paired differences by seed are -20 and -6, mean -13, std (ddof 1) 9.9
    assert "| GGN | +12.0 +- 2.0 | +10.0, +14.0 | -13.0 +- 9.9 |" in text
    assert "`toy.json`" in text and "`results/retrain_check.json`" in text
    assert results_markdown(tmp_path) == text  # deterministic
    out = write_results_md(tmp_path, tmp_path / "out" / "results.md")
    assert out.read_text(encoding="utf-8") == text


def test_display_accepts_keys_and_labels():
    assert display("ggn_diag") == "GGN (true Fisher, closed form) (diag)"
    assert display("mc_fisher_k4") == "true Fisher (MC, k=4)"
    assert display("GGN (true Fisher, closed form)") == "GGN (true Fisher, closed form)"
    assert display("random") == "random"


def test_generator_refuses_a_missing_folder(tmp_path):
    with pytest.raises(NotADirectoryError, match="results"):
        results_markdown(tmp_path / "nope")


def test_untracked_side_runs_do_not_leak_into_the_report(tmp_path):
    """Only files git tracks are rendered with tracked_only: a side run's results/<run>.json stays out."""
    import subprocess

    (tmp_path / "kept.json").write_text(json.dumps({"robustness": {}}))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "kept.json"], cwd=tmp_path, check=True)
    (tmp_path / "side_1234abcd.json").write_text(json.dumps({"training": {"valid_ppl": 8700.6}}))
    assert "side_1234abcd" in results_markdown(tmp_path)
    text = results_markdown(tmp_path, tracked_only=True)
    assert "side_1234abcd" not in text and "8700" not in text
