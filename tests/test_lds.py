"""The linear datamodeling score: against a loop of scipy.stats.spearmanr, and on a convex model retrained exactly,
where exact influence must predict the retrained losses (LDS >= 0.95)."""

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from ifutils.metrics import linear_datamodeling_score


def test_lds_equals_a_scipy_loop_and_the_ceiling_the_seed_to_seed_spearman():
    rng = np.random.default_rng(0)
    n, m, s, q = 30, 12, 2, 4
    scores = rng.normal(size=(n, q))
    masks = rng.random((m, n)) < 0.5
    losses = (masks @ scores)[:, None, :] + rng.normal(scale=2.0, size=(m, s, q))
    out = linear_datamodeling_score(scores, masks, losses)
    loop = [stats.spearmanr((masks @ scores)[:, j], losses[:, :, j].mean(1))[0] for j in range(q)]
    assert out["per_query"] == pytest.approx(loop, abs=1e-12) and out["lds"] == pytest.approx(np.mean(loop))
    assert out["ci"][0] <= out["lds"] <= out["ci"][1]
    ceiling = [stats.spearmanr(losses[:, 0, j], losses[:, 1, j])[0] for j in range(q)]
    assert out["ceiling"] == pytest.approx(np.mean(ceiling), abs=1e-12)
    losses[0, 1, 0] = np.nan  # an unfinished model: its subset is left out
    assert linear_datamodeling_score(scores, masks, losses)["subsets"] == m - 1
    with pytest.raises(ValueError, match="shapes"):
        linear_datamodeling_score(scores, masks[:, :-1], losses)
    with pytest.raises(ValueError, match="at least 3"):
        linear_datamodeling_score(scores, masks[:2], losses[:2])


def _softmax_regression(x, y, weights, reg, classes):
    """argmin_W (1/n) sum_i w_i CE(W x_i, y_i) + reg/2 ||W||^2, exactly (L-BFGS to a gradient of 1e-12)."""
    n, d = x.shape

    def f(flat):
        w = torch.tensor(flat.reshape(classes, d), requires_grad=True)
        loss = (torch.tensor(weights) * torch.nn.functional.cross_entropy(torch.tensor(x) @ w.T, torch.tensor(y),
                                                                          reduction="none")).sum() / n
        loss = loss + reg / 2 * (w**2).sum()
        (g,) = torch.autograd.grad(loss, w)
        return float(loss.detach()), g.numpy().ravel().astype(np.float64)

    res = optimize.minimize(f, np.zeros(classes * d), jac=True, method="L-BFGS-B",
                            options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 5000})
    return res.x.reshape(classes, d)


def test_exact_influence_of_a_convex_model_predicts_exact_retraining():
    """Softmax regression on fixed features, retrained exactly on 40 random halves: the summed exact influence
    (-g_q^T H^{-1} g_i, H the Hessian of the full objective) predicts the retrained query losses, LDS >= 0.95."""
    rng = np.random.default_rng(1)
    n, d, classes, reg, m, nq = 80, 4, 3, 0.05, 40, 8
    true = rng.normal(size=(classes, d))
    x = rng.normal(size=(n + nq, d))
    y = np.array([rng.choice(classes, p=np.exp(r) / np.exp(r).sum()) for r in x @ true.T])
    xt, yt, xq, yq = x[:n], y[:n], x[n:], y[n:]
    w_hat = torch.tensor(_softmax_regression(xt, yt, np.ones(n), reg, classes))

    def loss_of(w, xs, ys):  # per-sample cross-entropy, (k,)
        return torch.nn.functional.cross_entropy(torch.tensor(xs) @ w.T, torch.tensor(ys), reduction="none")

    flat = w_hat.reshape(-1).clone()
    objective = lambda v: loss_of(v.reshape(classes, d), xt, yt).mean() + reg / 2 * (v**2).sum()  # noqa: E731
    hess = torch.autograd.functional.hessian(objective, flat)
    grads = torch.stack([torch.autograd.functional.jacobian(lambda v: loss_of(v.reshape(classes, d), xt[i:i + 1],
                                                                               yt[i:i + 1])[0], flat) for i in range(n)])
    gq = torch.stack([torch.autograd.functional.jacobian(lambda v: loss_of(v.reshape(classes, d), xq[j:j + 1],
                                                                            yq[j:j + 1])[0], flat) for j in range(nq)])
    scores = -(grads @ torch.linalg.solve(hess, gq.T))  # (n, nq): d loss_q / d epsilon_i
    masks = np.zeros((m, n), dtype=bool)
    for k in range(m):
        masks[k, rng.choice(n, n // 2, replace=False)] = True
    losses = np.stack([loss_of(torch.tensor(_softmax_regression(xt, yt, masks[k].astype(float), reg, classes)), xq,
                               yq).numpy() for k in range(m)])[:, None, :]
    out = linear_datamodeling_score(scores, masks, losses)
    assert out["lds"] >= 0.95, out
    shuffled = linear_datamodeling_score(scores[torch.randperm(n)], masks, losses)  # the wrong sentences
    assert shuffled["lds"] < 0.5
    assert out["ceiling"] is None and out["seeds"] == 1


def test_lds_study_on_a_tiny_corpus_assembles_the_measured_losses_and_scores_every_curvature(tmp_path):
    """Retrain a tiny model on 4 halves x 2 seeds, predict with every whole-network curvature, and check the
    measured-loss array against the records read one by one and the LDS against the metric on those arrays."""
    import json

    from ifutils.experiments.lds import LdsConfig, lds_predictions, lds_table, measured_losses, query_indices, study_units
    from ifutils.experiments.whole_network import WholeNetworkConfig
    from ifutils.io import load_checkpoint
    from ifutils.retrain import RetrainSpec, Unit, run_units, train_unit

    from .test_whole_network import _tiny_setup

    corpus, _ = _tiny_setup()
    spec = RetrainSpec(n_train=40, emb_dim=4, hidden=4, epochs=2, batch_size=8)
    design = LdsConfig(subsets=4, seeds=(0, 1), beta=0.5)
    units = study_units(spec, design)
    run_units(corpus, spec, units, tmp_path / "units")
    train_unit(corpus, spec, Unit("full", tuple(range(40)), 0), tmp_path)
    model, _, _ = load_checkpoint(tmp_path / "full" / "model.pt")
    queries = query_indices(corpus, 3, seed=0)
    records = {u.name: json.loads((tmp_path / "units" / u.name / "record.json").read_text()) for u in units}
    masks, losses, subsets = measured_losses(records, units, design.seeds, queries, spec.n_train)
    assert masks.shape == (4, 40) and losses.shape == (4, 2, 4) and masks.sum(1).tolist() == [20] * 4
    for m, name in enumerate(subsets):  # brute force, record by record
        for k, seed in enumerate(design.seeds):
            r = records[f"{name}_s{seed}"]
            assert losses[m, k, 0] == pytest.approx(np.mean(r["valid_losses"]))
            assert list(losses[m, k, 1:]) == [r["valid_losses"][q] for q in queries]
        unit = next(u for u in units if u.name == f"{name}_s0")
        assert np.flatnonzero(masks[m]).tolist() == sorted(unit.indices)
    config = WholeNetworkConfig(n_fit=10, n_test=3, n_exact=0, exact_curvatures=(), chunk_size=8)
    predictions, info = lds_predictions(model.eval(), corpus, 40, queries, config, (0.1,), tmp_path / "scores")
    assert {k for k, _ in predictions} == {"ekfac", "kfac", "ekfac_ef", "kfac_ef", "mc_fisher_k1_diag", "ef_diag",
                                           "identity"}
    table = lds_table(predictions, masks, losses)
    entry = table["identity@0.1"]
    expected = linear_datamodeling_score(predictions[("identity", 0.1)][:, 1:], masks, losses[:, :, 1:])
    assert entry["lds"] == pytest.approx(expected["lds"]) and entry["ceiling"] == pytest.approx(expected["ceiling"])
    assert -1 <= entry["validation"] <= 1 and len(table) == 7 * 2
