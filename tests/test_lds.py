"""The linear datamodeling score: against a loop of scipy.stats.spearmanr, and on a convex model retrained exactly,
where exact influence must predict the retrained losses (LDS >= 0.95)."""

import math
from dataclasses import asdict

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

    from ifutils.experiments.lds import LdsConfig, measured_losses, query_indices, study_units
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
    _check_every_method(model.double().eval(), corpus, masks, losses, queries, tmp_path)


def _check_every_method(model, corpus, masks, losses, queries, tmp_path):
    import copy
    import json

    """Every method group on the tiny model, against oracles built from a loop of per-sentence autograd gradients:
    identity and cosine (closed form), the Kronecker curvatures (their own solve instead of the eigenbasis
    rotation), the diagonal Fishers, TRAK (the dense projection matrix), TracIn (weighted sum over checkpoints),
    multi-shift CG on the GGN (a dense GGN built column by column); then the LDS table against the metric."""
    from ifutils.curvature.estimators import CurvatureProducts
    from ifutils.curvature.network_kfac import diagonal_fisher, ekfac_network_curvature, fit_network_kfac
    from ifutils.experiments.lds import best_dampings, lds_table
    from ifutils.experiments.lds_methods import GROUPS, Context, MethodsConfig, method_predictions
    from ifutils.experiments.whole_network import Stages, WholeNetworkConfig
    from ifutils.io import save_checkpoint

    from .test_datamodels import _flat_loop

    eos = corpus.vocab.stoi["<eos>"]
    train, valid = corpus.splits["train"][:40], corpus.splits["valid"]
    g = _flat_loop(model, train)
    gv = _flat_loop(model, valid)
    gq = torch.cat([gv.mean(0, keepdim=True), gv[queries]])  # (1 + Q, P)
    w = torch.tensor(masks, dtype=torch.float64)
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, model, corpus.vocab)  # the scored model itself: its TracIn term is the identity's
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ckpt2 = tmp_path / "other.pt"
    save_checkpoint(ckpt2, other, corpus.vocab)  # an earlier checkpoint: a pass of its own (float32 on reload)
    g2, gv2 = _flat_loop(other.float().double(), train), _flat_loop(other.float().double(), valid)
    gq2 = torch.cat([gv2.mean(0, keepdim=True), gv2[queries]])
    wconfig = WholeNetworkConfig(n_fit=10, n_test=3, n_exact=0, exact_curvatures=(), chunk_size=8)
    mconfig = MethodsConfig(n_queries=len(queries), dampings=(1e-2, 1.0), n_solver_queries=2, cg_tol=1e-10,
                            cg_max_iter=400, arnoldi_rank=4, lissa_depth=20, lissa_batch=5, k_out=2, k_in=2,
                            subset_coords=6)
    ctx = Context(model, corpus, masks, queries, mconfig, wconfig, [(str(ckpt), 0.5), (str(ckpt2), 0.25)],
                  tmp_path / "cache", Stages(), archive_dir=tmp_path / "archive")
    seen = []
    preds = method_predictions(ctx, on_group=lambda name, _: seen.append(name))
    assert seen == list(GROUPS)
    brute = -(w @ g @ gq.T).numpy()
    np.testing.assert_allclose(preds["identity"]["pred"][0], brute, rtol=1e-5, atol=1e-8)  # float32 storage
    unit = g / g.norm(dim=1, keepdim=True)
    np.testing.assert_allclose(preds["cosine"]["pred"][0], -(w @ unit @ (gq / gq.norm(dim=1, keepdim=True)).T).numpy(),
                               rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(preds["tracin"]["pred"][0], 0.5 * brute - 0.25 * (w @ g2 @ gq2.T).numpy(),
                               rtol=1e-4, atol=1e-7)
    factors = fit_network_kfac(model, train, eos, labels="model", n_fit=10, chunk_size=8, seed=0)
    ekfac = ekfac_network_curvature(factors)
    assert preds["ekfac"]["dampings"][0] == pytest.approx(0.1 * ekfac.mean_eigenvalue())
    for k, d in enumerate(preds["ekfac"]["dampings"]):  # the grid (fishers), then the low dampings (fishers_low)
        expected = -(w @ g @ ekfac.solve(gq.T, d)).numpy()
        rel = np.abs(preds["ekfac"]["pred"][k] - expected).max() / np.abs(expected).max()
        assert rel < 1e-5, (d, rel)
    diag = diagonal_fisher(model, train, eos, labels="data", n_fit=10, chunk_size=8, seed=0)
    np.testing.assert_allclose(preds["ef_diag"]["pred"][1], -(w @ g @ (gq / (diag.d + 1e-2)).T).numpy(), rtol=1e-5)
    # the fishers_low group extends the six Fishers' sweeps below the grid, in the same entries
    from ifutils.experiments.lds_methods import LOW_DAMPINGS

    for key in ("ekfac", "kfac", "ekfac_ef", "kfac_ef", "ef_diag", "mc_fisher_k1_diag"):
        entry = preds[key]
        kept = [d for d in LOW_DAMPINGS if d not in entry["meta"]["skipped_not_positive_definite"]]
        assert entry["dampings"] == [*ctx.dampings(), *kept] and entry["group"] == "fishers", key
        assert entry["pred"].shape[0] == len(entry["dampings"]) and entry["meta"]["extended_by"] == ["fishers_low"]
        assert all(entry["meta"]["min_eigenvalue"] + d <= 0 for d in entry["meta"]["skipped_not_positive_definite"])
    for k, d in enumerate(preds["ef_diag"]["dampings"]):
        np.testing.assert_allclose(preds["ef_diag"]["pred"][k], -(w @ g @ (gq / (diag.d + d)).T).numpy(), rtol=1e-4)
    # the diagonal EF on every training sentence, at the grid and the low dampings
    full = diagonal_fisher(model, train, eos, labels="data", n_fit=None, chunk_size=8, seed=0)
    assert preds["ef_all_diag"]["dampings"] == [*ctx.dampings(), *LOW_DAMPINGS]
    assert preds["ef_all_diag"]["meta"]["zero_eigenvalues"] == int((full.d == 0).sum())
    for k, d in enumerate(preds["ef_all_diag"]["dampings"]):
        np.testing.assert_allclose(preds["ef_all_diag"]["pred"][k], -(w @ g @ (gq / (full.d + d)).T).numpy(),
                                   rtol=1e-5)  # the float32 gradient sums
    # EK-FAC on every training sentence, at the grid and the low dampings: its own solve
    ekfac_all = ekfac_network_curvature(fit_network_kfac(model, train, eos, labels="model", n_fit=None, chunk_size=8,
                                                         seed=0))
    entry = preds["ekfac_all"]
    assert entry["meta"]["n_fit"] == 40 and entry["dampings"][: len(ctx.dampings())] == ctx.dampings()
    for k, d in enumerate(entry["dampings"]):
        expected = -(w @ g @ ekfac_all.solve(gq.T, d)).numpy()
        assert np.abs(entry["pred"][k] - expected).max() / np.abs(expected).max() < 1e-5, d
    assert np.isfinite(preds["kfac_all"]["pred"]).all()
    # the lexical control against TF-IDF by its formula: raw counts x (ln((1 + n) / (1 + df)) + 1), rows l2-normed
    docs = lambda ss: [[t for t in x.tolist() if t != eos] for x in ss]  # noqa: E731
    vocab = sorted({t for d in docs(train) for t in d})
    df = np.array([sum(t in d for d in docs(train)) for t in vocab], dtype=np.float64)
    idf = np.log((1 + len(train)) / (1 + df)) + 1

    def vec(d):
        v = np.array([d.count(t) for t in vocab], dtype=np.float64) * idf
        return v / np.linalg.norm(v) if np.linalg.norm(v) > 0 else v

    tv, vv = np.array([vec(d) for d in docs(train)]), np.array([vec(d) for d in docs(valid)])
    counts = np.array([len(d) for d in docs(valid)], dtype=np.float64)
    sims = np.column_stack([tv @ (vv.T @ (counts / counts.sum())), tv @ vv[queries].T])
    np.testing.assert_allclose(preds["tfidf"]["pred"][0], -(masks.astype(np.float64) @ sims), rtol=1e-10, atol=1e-12)
    proj = ctx.projection().matrix().double()
    phi, phi_q = g @ proj.T, gq @ proj.T
    kernel = phi.T @ phi / len(phi)
    d = preds["trak"]["dampings"][2]
    expected = -((w @ phi) @ torch.linalg.solve(kernel + d * torch.eye(len(kernel), dtype=torch.float64), phi_q.T))
    np.testing.assert_allclose(preds["trak"]["pred"][2], expected.numpy(), rtol=1e-4, atol=1e-8)
    products = CurvatureProducts(model, ctx.fit, eos)
    eye = torch.eye(products.p, dtype=torch.float64)
    ggn = torch.stack([products.fisher_vp(c) for c in eye], 1)
    for k, d in enumerate(preds["ggn"]["dampings"]):
        x = torch.linalg.solve(ggn + d * eye, gq[:3].T)
        np.testing.assert_allclose(preds["ggn"]["pred"][k], -(w @ g @ x).numpy(), rtol=1e-4, atol=1e-8)
    assert preds["ggn"]["pred"].shape[2] == 3 and preds["hessian_lissa"]["pred"].shape[2] == 3
    for key in ("subset_hessian", "ggn_arnoldi_r4", "arnoldi_r4", "kfac", "ekfac_ef", "kfac_ef", "mc_fisher_k1_diag"):
        assert np.isfinite(preds[key]["pred"]).all(), key
    table = lds_table(preds, losses, n_solver=2)
    entry = table["identity"]
    expected = linear_datamodeling_score(-(g @ gq.T).numpy()[:, 1:], masks, losses[:, :, 1:])
    assert entry["lds"] == pytest.approx(expected["lds"]) and entry["ceiling"] == pytest.approx(expected["ceiling"])
    assert -1 <= entry["validation"] <= 1 and entry["damping"] is None
    assert table[f"ekfac@{preds['ekfac']['dampings'][0]:.3g}"]["default"]
    assert entry["solver_queries"]["lds"] == pytest.approx(np.mean(expected["per_query"][:2]))
    best = best_dampings(table)
    assert best["ekfac"]["lds"] == max(r["lds"] for r in table.values() if r["key"] == "ekfac")
    # paired differences at the default dampings: the table's two LDS values subtracted (another code path)
    from ifutils.experiments.lds import lds_differences

    differences = lds_differences(preds, losses, resamples=200)
    default_ekfac = table[f"ekfac@{preds['ekfac']['dampings'][0]:.3g}"]
    d = differences["identity"]["ekfac"]
    assert d["difference"] == pytest.approx(default_ekfac["lds"] - entry["lds"], abs=1e-12) and d["queries"] == 3
    assert d["ci_two_way"][0] <= d["difference"] <= d["ci_two_way"][1]
    assert differences["ekfac"]["identity"]["difference"] == pytest.approx(-d["difference"], abs=1e-12)
    assert differences["identity"]["ggn"]["queries"] == 2  # CG solves only the first n_solver queries
    best_diff = lds_differences(preds, losses, resamples=50, at="best", table=table)["identity"]["ekfac"]
    assert best_diff["difference"] == pytest.approx(best["ekfac"]["lds"] - entry["lds"], abs=1e-12)
    assert best_diff["damping"] == best["ekfac"]["damping"] and best_diff["reference_damping"] is None
    with pytest.raises(ValueError, match="at must be"):
        lds_differences(preds, losses, at="best")
    assert "ekfac" not in differences["ekfac"] and set(differences["identity"]) == set(preds) - {"identity"} - {
        k for k, v in preds.items() if v["dampings"] != [None] and not any(
            math.isclose(x, v["default_damping"], rel_tol=1e-9) for x in v["dampings"])}
    from ifutils.experiments.plots import lds_by_method, lds_vs_damping

    lds_by_method({"lds": table}, "tiny", tmp_path / "methods.png")
    lds_vs_damping({"lds": table}, "tiny", tmp_path / "damping.png")
    assert (tmp_path / "methods.png").stat().st_size > 0 and (tmp_path / "damping.png").stat().st_size > 0
    from ifutils.experiments.lds import format_lds
    from ifutils.experiments.report import results_markdown

    results = {"spec": {"hidden": 3, "n_train": 40, "epochs": 2}, "design": {}, "M": 4, "beta": 0.5, "S": 2,
               "complete_subsets": 4, "finished_models": 8, "queries": queries, "default_damping": 1e-3,
               "methods_config": {"n_solver_queries": 2}, "lds": table, "counterfactual": None,
               "methods": {k: {"meta": v["meta"], "dampings": v["dampings"]} for k, v in preds.items()},
               "differences": differences,
               "differences_best": lds_differences(preds, losses, resamples=50, at="best", table=table)}
    text = format_lds(results)
    assert "| EK-FAC | " + f"{d['difference']:+.3f}" in text.split("Paired differences")[1]
    assert f"at {best['ekfac']['damping']:.2g}" in text.split("Paired differences")[2]
    assert "Seed-to-seed agreement" in text and "the mean of S = 2 seeds" in text and "| EK-FAC |" in text and "multi-shift CG on 3 query columns" in text
    # the best damping against the spectrum: ratios by hand from a stated spectrum
    from ifutils.experiments.lds import best_dampings, damping_against_spectrum

    results.update({"best": best_dampings(table), "whole_network_config": {"alpha": 0.1},
                    "spectrum": {"H": {"lambda_min": -0.05, "lambda_max": 2.0}, "F": {"lambda_max": 4.0}}})
    rel = damping_against_spectrum(results)
    assert rel["mean_eigenvalue"] == pytest.approx(1e-2)
    for key, r in rel["methods"].items():
        d = results["best"][key]["damping"]
        assert r["over_mean"] == pytest.approx(d / 1e-2) and r["over_ggn_max"] == pytest.approx(d / 4.0)
        assert r["above_h_min"] == (d > 0.05)
        grid = results["methods"][key].get("dampings") or []
        assert r["edge"] == (None if len(grid) < 2 else "low" if d == min(grid) else "high" if d == max(grid) else None)
    assert any(r["edge"] for r in rel["methods"].values())  # the tiny study's sweep peaks at an end for some method
    assert "Best damping against the spectrum" in format_lds(results)
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "lds.json").write_text(json.dumps(results, default=float))
    assert "## Linear datamodeling score" in results_markdown(tmp_path / "res")
    # a rerun reads every group back from the cache (no stage runs again)
    again = Context(model, corpus, masks, queries, mconfig, wconfig, [(str(ckpt), 0.5), (str(ckpt2), 0.25)],
                    tmp_path / "cache", Stages())
    second = method_predictions(again)
    assert not any(name.startswith("method group") for name in again.stages.records)
    np.testing.assert_array_equal(second["ekfac"]["pred"], preds["ekfac"]["pred"])
    # a fresh clone (no cache): every group is read back from the archive kept in the repository, identical
    assert sorted(p.stem for p in (tmp_path / "archive").glob("*.npz")) == sorted(GROUPS)
    assert {p.stem for p in (tmp_path / "archive").glob("*.json")} == {*GROUPS, "default_damping", "spectrum"}
    fresh = Context(model, corpus, masks, queries, mconfig, wconfig, [(str(ckpt), 0.5), (str(ckpt2), 0.25)],
                    None, Stages(), archive_dir=tmp_path / "archive")
    third = method_predictions(fresh)
    assert not fresh.stages.records  # no group, no EK-FAC fit for the default damping: nothing computed
    assert fresh.default_damping == ctx.default_damping and not fresh.stages.records
    assert third.keys() == preds.keys()
    for key in preds:
        np.testing.assert_array_equal(third[key]["pred"], preds[key]["pred"])
        assert third[key]["dampings"] == preds[key]["dampings"] and third[key]["meta"] == preds[key]["meta"]
    # another design (other masks) does not take the archived predictions: the group is computed again
    other_masks = masks.copy()
    other_masks[0] = ~other_masks[0]
    mconfig_one = MethodsConfig(**{**asdict(mconfig), "groups": ("identity",)})
    moved = Context(model, corpus, other_masks, queries, mconfig_one, wconfig, [(str(ckpt), 0.5)], None, Stages(),
                    archive_dir=tmp_path / "archive")
    assert np.abs(method_predictions(moved)["identity"]["pred"][0] - preds["identity"]["pred"][0]).max() > 0
    assert any(name.startswith("method group") for name in moved.stages.records)


def test_the_entry_points_guard_of_committed_results_and_its_archive_paths(tmp_path, monkeypatch, capsys):
    """experiments/lds.py: a score over fewer complete subsets than the results file holds is redirected to cache/
    (never over the committed file) unless the file is named; the archive mirrors --root, is off with another root
    unless named; a retrained full-data model of other weights is reported."""
    import argparse
    import importlib.util
    import json
    from pathlib import Path

    from ifutils.io import project_path, save_checkpoint

    from .test_whole_network import _tiny_setup

    spec = importlib.util.spec_from_file_location("lds_entry", Path(__file__).parent.parent / "experiments" / "lds.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    committed = tmp_path / "ptb_lds.json"
    committed.write_text(json.dumps({"complete_subsets": 100}))
    assert entry.guard_results(committed, 100, explicit=False) == (committed, False)
    assert entry.guard_results(committed, 40, explicit=True) == (committed, False)
    assert entry.guard_results(tmp_path / "new.json", 3, explicit=False) == (tmp_path / "new.json", False)
    path, redirected = entry.guard_results(committed, 40, explicit=False)
    assert redirected and path == project_path("cache") / "ptb_lds.partial.json"

    args = lambda **kw: argparse.Namespace(**{"root": "checkpoints/lds", "archive": None, **kw})  # noqa: E731
    below = project_path("checkpoints/lds") / "w128_n10000_x" / "e7_removals"
    assert entry.archive_for(args(), below) == project_path("results/retrained/lds/w128_n10000_x/e7_removals")
    assert entry.archive_for(args(archive="none"), below) is None
    scratch = tmp_path / "scratch"
    assert entry.archive_for(args(root=str(scratch)), scratch / "m") is None
    assert entry.archive_for(args(root=str(scratch), archive=str(tmp_path / "a")), scratch / "m") == tmp_path / "a" / "m"

    corpus, model = _tiny_setup()
    save_checkpoint(tmp_path / "full.pt", model.float(), corpus.vocab)
    choice = {"checkpoint": str(tmp_path / "full.pt"), "epochs": 1, "history": [{"valid_ppl": 10.0}]}
    assert entry.check_full_model(choice, tmp_path / "arch") and entry.check_full_model(choice, tmp_path / "arch")
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1.0
    save_checkpoint(tmp_path / "full.pt", model.float(), corpus.vocab)
    assert not entry.check_full_model(choice, tmp_path / "arch")
    assert "WARNING: the retrained full-data model differs" in capsys.readouterr().err
