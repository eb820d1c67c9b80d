"""Robustness sweeps on a tiny model: rows carry the setting, the reference agrees with itself, CIs bracket."""

import torch

from ifutils.experiments.comparison import REFERENCE, InfluenceConfig
from ifutils.experiments.sweeps import agreement_with_ci, estimation_rows, setting_rows
from ifutils.subset import default_subset

from .conftest import EOS, random_sentences, subset_loss


def _setup(model):
    train, test = random_sentences(12, 13, seed=1), random_sentences(4, 13, seed=2)
    config = InfluenceConfig(num_coords=20, n_hessian=8, n_train=12, n_test=4, mc_samples=2, top_k=3, dtype="float64",
                             absolute_dampings=(1e-3, 1e-1), default_damping=1e-1)
    return {"train": train, "hessian": train[:8], "test": test}, config


def test_agreement_with_itself_is_one_and_intervals_bracket_the_mean():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(30, 5, generator=g, dtype=torch.float64)
    same = agreement_with_ci(ref, ref)
    assert abs(same["spearman"] - 1) < 1e-12 and abs(same["pearson"] - 1) < 1e-12
    noisy = agreement_with_ci(ref, ref + torch.randn(30, 5, generator=g, dtype=torch.float64), resamples=300)
    assert noisy["spearman_ci"][0] <= noisy["spearman"] <= noisy["spearman_ci"][1] < 1


def test_setting_rows_compare_every_kept_curvature_with_the_hessian(model):
    samples, config = _setup(model)
    rows, extra = setting_rows(model, EOS, samples, config, {"seed": 7})
    names = {r["curvature"] for r in rows}
    assert {REFERENCE, "ef", "kfac", "mc_fisher_k2"} <= names and "hessian_cg" not in names
    assert all(r["seed"] == 7 for r in rows)
    assert next(r for r in rows if r["curvature"] == REFERENCE)["spearman"] > 0.999
    assert extra["best_damping"][REFERENCE] in (1e-3, 1e-1) and "mean" in extra["spectra"][REFERENCE]


def test_estimation_rows_use_fewer_sentences_and_draws(model):
    samples, config = _setup(model)
    out = estimation_rows(subset_loss(model, "recurrent"), samples, config, counts=(4, 8), mc_draws=(1, 3))
    assert sorted({r["sentences"] for r in out["sentences"]}) == [4, 8]
    # with all n_H sentences, the Hessian row is the reference itself
    assert next(r for r in out["sentences"] if r["sentences"] == 8 and r["curvature"] == REFERENCE)["spearman"] > 0.999
    assert {r["curvature"] for r in out["mc_draws"]} == {"mc_fisher_k1", "mc_fisher_k3"}
    assert sorted({r["lambda"] for r in out["damping"]}) == [1e-3, 1e-1] == sorted({r["lambda"] for r in out["damping_alike"]})
    # against the fixed reference, the Hessian damped like it is the reference itself
    assert next(r for r in out["damping"] if r["lambda"] == 1e-1 and r["curvature"] == REFERENCE)["spearman"] > 0.999


def test_embedding_subset_takes_rows_of_the_most_frequent_words(model):
    subset = default_subset(model, "embedding", num_coords=20, seed=0)
    rows = subset.indices["embedding.weight"] // model.config.emb_dim
    assert subset.size == 20 and int(rows.max()) < 4  # ceil(20 / min(16, E=5)) = 4 rows
    assert default_subset(model, "input", 20).names == ["lstm.weight_ih_l0"]


def test_findings_tables_report_slopes_and_seed_spread(tmp_path):
    import json

    from ifutils.experiments.findings import findings

    entries = {f"h{m}/init/F": {"width": m, "state": "init", "curvature": "F", "mean": 3.0 / m, "second_moment": 2.0,
                                "lambda_max": 0.5 * m} for m in (64, 128, 256)}
    (tmp_path / "spectrum.json").write_text(json.dumps({"entries": entries}))
    (tmp_path / "retrain_check.json").write_text(json.dumps({
        "n_removed": 5, "noise_floor": {"valid": 0.4}, "full": {"valid": {"mean": 150.0}},
        "methods": {"ggn": {"valid": {"mean": -1.0, "std": 0.2, "per_seed": {"0": -1.2, "1": -0.8}}}}}))
    text = findings(tmp_path, "missing", ())
    assert "m -1.00 (theory -1), s +0.00 (0), lambda_max +1.00 (+1)" in text
    assert "150.00 +- 0.40" in text and f"{'GGN (true Fisher, closed form)':32s} delta ppl  -1.000 +- 0.200" in text


def test_spectrum_table_prefers_exact_values_over_probe_estimates():
    from ifutils.experiments.findings import spectrum_table

    # probe estimates deliberately off by 10x; the exact slopes are -1 (m) and +1 (lambda_max)
    entries = {f"h{m}/trained/EF": {"width": m, "state": "trained", "curvature": "EF", "mean": 30.0, "mean_se": 1.0,
                                    "second_moment": 2.0, "second_moment_se": 0.1, "lambda_max": 5.0,
                                    "exact": {"mean": 3.0 / m, "second_moment": 2.0, "lambda_max": 0.5 * m}}
               for m in (64, 128, 256)}
    text = spectrum_table({"entries": entries})
    assert "slopes in width, trained EF: m -1.00 (theory -1), s +0.00 (0), lambda_max +1.00 (+1)" in text
    assert f"{3.0 / 64:10.3e}" in text and "3.000e+01" not in text
