"""The comparison stages on a tiny model: every curvature is built, the table picks the right rows."""

import torch

from ifutils.grads import per_sample_grads
from ifutils.study import (
    REFERENCE,
    InfluenceConfig,
    StageTimer,
    build_curvatures,
    comparison_table,
    damping_sweep,
    format_comparison,
    hessian_free_scores,
)

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
    assert list(curvatures)[0] == REFERENCE and {"KFAC", "EK-FAC", "EF (token)", "EF (Woodbury)"} <= set(curvatures)
    rows = damping_sweep(g_train, g_test, curvatures, config, hessian_free_scores(g_train, g_test))
    table = {e["curvature"]: e for e in comparison_table(rows, curvatures, timer, config.default_damping)}
    # the exact solvers reproduce the Hessian wherever H + lambda I is positive definite
    for name in ("Hessian (CG)", "Hessian (Arnoldi, r=20)", "Hessian (LiSSA)"):
        for r in rows:
            if r["curvature"] == name and not r["reference_indefinite"] and r["mode"] == "absolute":
                assert r["spearman"] > 0.999, (name, r)
    ref_rows = [r for r in rows if r["curvature"] == REFERENCE]
    assert all(r["spearman"] > 0.999 for r in ref_rows)
    # the best damping is the highest-Spearman row among those with a positive definite reference
    ggn = [r for r in rows if r["curvature"] == "GGN (true Fisher, closed form)" and not r["reference_indefinite"]]
    assert table["GGN (true Fisher, closed form)"]["best"]["spearman"] == max(r["spearman"] for r in ggn)
    assert table["Hessian"]["shared_with"] == ["GGN (true Fisher, closed form)", "EF (token)"]
    assert "gradient cosine" in format_comparison(list(table.values()))
    assert torch.isfinite(torch.tensor([e["default"]["spearman"] for e in table.values()])).all()
