"""The comparison stages on a tiny model: every curvature is built, the table picks the right rows."""

import torch

from ifutils.curvature.labels import label
from ifutils.experiments.comparison import (
    GGN,
    REFERENCE,
    InfluenceConfig,
    StageTimer,
    build_curvatures,
    comparison_table,
    damping_sweep,
    dense_spectra_keys,
    format_comparison,
    hessian_free_scores,
    matrix_errors,
    scatter_keys,
)
from ifutils.grads import per_sample_grads

from .conftest import random_sentences, subset_loss


def test_every_curvature_is_built_and_compared(model):
    loss = subset_loss(model, "recurrent")
    train, test = random_sentences(12, 13, seed=1), random_sentences(3, 13, seed=2)
    config = InfluenceConfig(num_coords=20, n_hessian=8, n_train=12, n_test=3, mc_samples=2, top_k=3, arnoldi_rank=20,
                             lissa_depth=3000, dtype="float64", absolute_dampings=(1e-3, 1e-1), relative_alphas=(1.0,),
                             default_damping=1e-1)
    timer = StageTimer()
    g_train, g_test = per_sample_grads(loss, train, desc=None), per_sample_grads(loss, test, desc=None)
    curvatures = build_curvatures(loss, train[:8], g_train[:8], config, timer)
    assert list(curvatures) == [REFERENCE, GGN, "ef_token", "mc_fisher_k2", "ef", "hessian_diag", "ggn_diag", "ef_diag",
                                "kfac", "ekfac", "ef_woodbury", "arnoldi_r20", "arnoldi_r20_complement", "hessian_cg",
                                "hessian_lissa", "ef_datainf", "identity"]
    assert all(c.name == key and label(key) for key, c in curvatures.items())  # every name is a key with a label
    assert set(dense_spectra_keys(2)) | set(scatter_keys(2)) <= set(curvatures)  # the notebook's lists exist
    assert list(hessian_free_scores(g_train[:2], g_test)) == ["cosine"]
    rows = damping_sweep(g_train, g_test, curvatures, config, hessian_free_scores(g_train, g_test))
    tuned = damping_sweep(g_train, g_test, curvatures, config, hessian_free_scores(g_train, g_test),
                          reference_damping=config.default_damping)
    table = {e["curvature"]: e for e in comparison_table(tuned, curvatures, timer, config.default_damping)}
    # the exact solvers reproduce the Hessian wherever H + lambda I is positive definite
    for name in ("hessian_cg", "arnoldi_r20", "arnoldi_r20_complement", "hessian_lissa"):
        for r in rows:
            if r["curvature"] == name and not r["reference_indefinite"] and r["mode"] == "absolute":
                assert r["spearman"] > 0.999, (name, r)
    ref_rows = [r for r in rows if r["curvature"] == REFERENCE]
    assert all(r["spearman"] > 0.999 for r in ref_rows)
    # the best damping is the highest-Spearman row of the fixed-reference sweep, where the reference never moves
    ggn = [r for r in tuned if r["curvature"] == GGN]
    assert table[GGN]["best"]["spearman"] == max(r["spearman"] for r in ggn)
    at_default = [r for r in tuned if r["curvature"] == REFERENCE and r["mode"] == "absolute"
                  and r["value"] == config.default_damping]
    assert at_default[0]["spearman"] > 0.999 and table[REFERENCE]["default"]["spearman"] > 0.999
    assert any(r["spearman"] < 0.999 for r in tuned if r["curvature"] == REFERENCE)  # the reference stays put
    assert table[REFERENCE]["shared_with"] == [GGN, "ef_token"]
    shown = format_comparison(list(table.values()))  # the table shows labels, never keys
    assert "gradient cosine" in shown and "EF (Woodbury)" in shown and "ef_woodbury" not in shown
    errors = matrix_errors(curvatures)
    assert errors[REFERENCE][REFERENCE] == 0 and errors[GGN][GGN] == 0
    g = curvatures[GGN].matrix
    off_diagonal = g - torch.diag(g.diagonal())  # what the diagonal approximation drops
    torch.testing.assert_close(errors["ggn_diag"][GGN],
                               float(off_diagonal.norm() / g.norm()))
    assert "hessian_cg" not in errors
    assert torch.isfinite(torch.tensor([e["default"]["spearman"] for e in table.values()])).all()


def test_multi_tensor_subset_gets_block_rows_and_reports_missing_relative_scales(model):
    """The mixed subset holds embedding rows (no KFAC) and a Hessian block with negative mean curvature:
    KFAC is skipped, block-diagonal curvatures appear, and a relative damping that does not exist gives a
    NaN row carrying the reason instead of stopping the sweep."""
    loss = subset_loss(model, "mixed")
    train, test = random_sentences(12, 13, seed=1), random_sentences(3, 13, seed=2)
    config = InfluenceConfig(num_coords=40, n_hessian=8, n_train=12, n_test=3, mc_samples=2, top_k=3, arnoldi_rank=8,
                             lissa_depth=200, dtype="float64", absolute_dampings=(1e-1,), relative_alphas=(1.0,),
                             default_damping=1e-1)
    g_train, g_test = per_sample_grads(loss, train, desc=None), per_sample_grads(loss, test, desc=None)
    curvatures = build_curvatures(loss, train[:8], g_train[:8], config, StageTimer())
    assert "kfac" not in curvatures and "hessian_blockdiag" in curvatures
    rows = damping_sweep(g_train, g_test, curvatures, config)
    failed = [r for r in rows if r["mode"] == "relative" and r["curvature"] == "hessian_blockdiag"]
    assert failed and failed[0]["spearman"] != failed[0]["spearman"] and "mean eigenvalue" in failed[0]["warnings"][0]
