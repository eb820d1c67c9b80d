"""The whole-network study's summaries: agreement with the reference against scipy loops, top sentences by rank,
and the configuration's checks (the pipeline itself is made of tested core parts: network, network_kfac, scoring)."""

import numpy as np
import pytest
import torch
from scipy import stats

from ifutils.experiments.whole_network import (
    WholeNetworkConfig,
    agreement_with_reference,
    top_sentences,
)


def test_agreement_equals_scipy_per_column_and_the_validation_query_apart():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 6))
    est = ref + rng.normal(scale=0.5, size=ref.shape)
    out = agreement_with_reference(est, ref, top_k=10)
    spearman = [stats.spearmanr(est[:, j], ref[:, j])[0] for j in range(1, 6)]
    assert out["spearman"]["mean"] == pytest.approx(np.mean(spearman), rel=1e-12)
    assert out["spearman"]["ci"][0] <= out["spearman"]["mean"] <= out["spearman"]["ci"][1]
    assert out["validation"]["pearson"] == pytest.approx(stats.pearsonr(est[:, 0], ref[:, 0])[0], rel=1e-12)
    harmful = [len(set(np.argsort(est[:, j])[-10:]) & set(np.argsort(ref[:, j])[-10:])) / 10 for j in range(1, 6)]
    assert out["top_k_harmful"]["mean"] == pytest.approx(np.mean(harmful))
    same = agreement_with_reference(ref, ref, top_k=10)
    assert same["spearman"]["mean"] == pytest.approx(1.0) and same["top_k_helpful"]["mean"] == 1.0


class _Vocab:
    itos = ["<eos>", "a", "b", "c"]


def test_top_sentences_are_the_most_negative_and_most_positive_influences():
    scores = np.array([[0.0, 3.0], [0.0, -2.0], [0.0, 1.0], [0.0, -5.0]])
    sentences = [torch.tensor([1, 0]), torch.tensor([2, 0]), torch.tensor([3, 0]), torch.tensor([1, 2, 0])]
    top = top_sentences(scores, 1, sentences, _Vocab(), shown=2)
    assert [s["index"] for s in top["helpful"]] == [3, 1] and [s["index"] for s in top["harmful"]] == [0, 2]
    assert top["helpful"][0] == {"index": 3, "influence": -5.0, "text": "a b"}


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="alpha"):
        WholeNetworkConfig(alpha=0.0)
    with pytest.raises(ValueError, match="n_test"):
        WholeNetworkConfig(n_test=0)


def _tiny_setup():
    from ifutils.data import Corpus, Vocabulary

    from .conftest import random_sentences, tiny_model

    vocab = Vocabulary(["<eos>"] + [f"w{i}" for i in range(1, 9)])
    corpus = Corpus("toy", vocab, {"train": random_sentences(40, 9, max_len=5, seed=1),
                                   "valid": random_sentences(6, 9, max_len=5, seed=2),
                                   "test": random_sentences(6, 9, max_len=5, seed=3)})
    return corpus, tiny_model(vocab=9, emb=3, hidden=3, seed=2)


def _dense(model, sentences, curvature):
    """Dense whole-network H (double backward) or GGN (J^T softmax-Hessian J) of (1/n) sum_i l_i, all parameters."""
    from torch.func import functional_call, jacrev

    from ifutils.data import make_batch
    from ifutils.model import sentence_loss

    names = [n for n, _ in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def unflat(t):
        out, k = {}, 0
        for n, s in zip(names, shapes):
            out[n] = t[k:k + s.numel()].reshape(s)
            k += s.numel()
        return out

    inputs, targets, mask = make_batch(sentences, 0)
    n = len(sentences)
    if curvature == "H":
        return torch.autograd.functional.hessian(
            lambda t: sentence_loss(functional_call(model, unflat(t), (inputs,)), targets, mask).sum() / n, theta)
    logits_of = lambda t: functional_call(model, unflat(t), (inputs,))  # noqa: E731
    z = logits_of(theta).detach()
    jac = jacrev(logits_of)(theta)  # (B, L, V, P)
    p = torch.softmax(z, -1)
    w = mask.double() / (n * mask.sum(1, keepdim=True).double())  # token weights 1/(n T_i)
    hz = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]
    return torch.einsum("bl,blvp,blvw,blwq->pq", w, jac, hz, jac)


def test_exact_reference_equals_dense_solves_and_the_study_runs_end_to_end(tmp_path):
    """CG on the matrix-free H and GGN equals a dense solve of the autograd Hessian / Jacobian GGN; the whole study
    (every curvature, several agreement passes, the full EK-FAC pass) writes a consistent results file whose
    identity scores equal -g_i^T g_query from a loop of torch.autograd.grad."""
    import json

    from ifutils.curvature.network_kfac import _fit_sentences
    from ifutils.data import make_batch
    from ifutils.experiments.whole_network import Stages, exact_reference, whole_network_study
    from ifutils.model import sentence_loss
    from ifutils.scoring import load_scores

    corpus, model = _tiny_setup()
    config = WholeNetworkConfig(n_fit=12, n_test=3, n_exact=2, n_agree=25, exact_dampings=(0.05,),
                                damping_grid=(0.01, 0.05), cg_tol=1e-10, cg_max_iter=500, lanczos_tol=1e-8,
                                lanczos_matvecs=400, pass_gib=30 * 8 * 4 / 2**30, chunk_size=7, top_k=5, shown=3)
    fit = _fit_sentences(corpus.splits["train"], config.n_fit, config.seed)
    grads = torch.randn(1 + config.n_exact, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    solutions, section = exact_reference(model, fit, 0, grads, config, Stages())
    for curvature, key in (("F", "ggn"), ("H", "hessian_cg")):
        dense = _dense(model, fit, curvature)
        if (key, 0.05) not in solutions:  # H + lambda I indefinite: skipped, and Lanczos must say so
            assert torch.linalg.eigvalsh(dense).min() + 0.05 <= 0
            continue
        expected = torch.linalg.solve(dense + 0.05 * torch.eye(len(dense), dtype=dense.dtype), grads.T).T
        assert torch.allclose(solutions[(key, 0.05)].double(), expected, rtol=1e-4, atol=1e-6)
    h = torch.linalg.eigvalsh(_dense(model, fit, "H"))
    assert section["spectrum"]["H"]["lambda_min"] == pytest.approx(float(h[0]), rel=1e-5, abs=1e-9)
    assert section["spectrum"]["H"]["lambda_max"] == pytest.approx(float(h[-1]), rel=1e-5)
    assert all(max(s["relative_residual"]) < 1e-8 for s in section["solves"] if "skipped" not in s)

    results = whole_network_study(model, corpus, config, __file__, tmp_path / "whole.json", tmp_path / "scores", None)
    assert json.loads((tmp_path / "whole.json").read_text())["n_agree"] == 25
    assert len([d for d in (tmp_path / "scores").iterdir() if d.name.startswith("agreement_")]) > 1  # several passes
    assert [p["dir"] for p in results["agreement_scores"]] == sorted(
        {p["dir"] for p in results["agreement_scores"]}, key=[p["dir"] for p in results["agreement_scores"]].index)
    assert set(results["curvatures"]) == {"ekfac", "kfac", "ekfac_ef", "kfac_ef", "mc_fisher_k1_diag", "ef_diag",
                                          "identity"}
    ref = results["agreement_with_exact"]["ggn@0.05"]["table"]
    assert set(ref) >= {"ekfac", "identity"} and ref["ekfac"]["best_damping"] in (0.01, 0.05, results["damping"])
    assert ref["ekfac"]["at_best_damping"]["spearman"]["mean"] >= ref["ekfac"]["at_reference_damping"]["spearman"]["mean"]
    # identity scores of the agreement set against the validation query, from a loop of autograd
    valid = corpus.splits["valid"]
    tokens = sum(len(s) for s in valid)
    params = list(model.parameters())

    def grad(s):
        inputs, targets, mask = make_batch([s], 0)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(sentence_loss(model(inputs), targets, mask)[0],
                                                                      params)])
    g_val = sum(grad(s) for s in valid) / len(valid)
    assert tokens > 0
    expected = torch.stack([-grad(s) @ g_val for s in corpus.splits["train"][:25]])
    top = results["top_sentences"]["validation"]["identity"]["harmful"][0]
    # the identity curvature is damped like the others: q = g / (1 + lambda)
    assert top["influence"] == pytest.approx(float(expected.max()) / (1 + results["damping"]), rel=1e-5)
    full, _ = load_scores(results["full_scores"]["dir"])
    assert full.shape == (40, 4) and np.isfinite(np.asarray(full)).all()
    # n_fit: the study's own n_fit reproduces its EK-FAC exactly; a smaller fit is another curvature
    from ifutils.experiments.whole_network import format_n_fit, n_fit_sweep

    sweep = n_fit_sweep(model, corpus, config, [6], __file__, tmp_path / "nfit.json", tmp_path / "scores", None)
    rows = {r["n_fit"]: r for r in sweep["rows"]}
    assert set(rows) == {6, 12} and rows[6]["tokens"] < rows[12]["tokens"]
    assert rows[12]["vs_study_ekfac"]["spearman"]["mean"] == pytest.approx(1.0)
    assert rows[12]["damping"] == pytest.approx(results["damping"])
    assert "| 6 |" in format_n_fit(sweep)
    # another configuration reuses the passes it shares: only the changed ones are scored again
    import ifutils.experiments.whole_network as wn

    scored = []
    real = wn.score_all
    wn.score_all = lambda *a, **k: (scored.append(str(a[4])), real(*a, **k))[1]
    try:
        other = whole_network_study(model, corpus, WholeNetworkConfig(**{**config.__dict__, "top_k": 4}), __file__,
                                    tmp_path / "other.json", tmp_path / "scores", None)
    finally:
        wn.score_all = real
    assert other["full_scores"]["dir"] == results["full_scores"]["dir"]
    assert [p["dir"] for p in other["agreement_scores"]] == [p["dir"] for p in results["agreement_scores"]]
    assert scored == []  # finished passes are read back, nothing is preconditioned or scored again
    assert other["curvatures"]["kfac"]["agreement_with_ekfac"]["spearman"] == \
        results["curvatures"]["kfac"]["agreement_with_ekfac"]["spearman"]


def test_bridge_the_whole_network_code_restricted_to_a_subset_equals_the_subset_code():
    """In float64 the whole-network gradients and H / GGN products, read at the subset, equal the subset code's,
    and the agreement it computes with them equals the one computed from the subset code's gradients."""
    from ifutils.curvature import hessian_and_ggn
    from ifutils.experiments.bridge import subset_bridge
    from ifutils.experiments.comparison import InfluenceConfig, choose_samples
    from ifutils.grads import per_sample_grads
    from ifutils.influence import influence
    from ifutils.metrics import agreement
    from ifutils.subset import SubsetLoss, default_subset

    corpus, model = _tiny_setup()
    config = InfluenceConfig(num_coords=10, n_hessian=8, n_train=15, n_test=3, top_k=3, dtype="float64")
    out = subset_bridge(model, corpus, None, config, probes=3, damping=0.05)
    assert out["grads_max_rel_diff"] < 1e-12 and max(out["products"].values()) < 1e-10
    samples = choose_samples(corpus, config)
    loss = SubsetLoss(model, default_subset(model, "recurrent", 10, 0), 0, torch.float64)
    g, t = per_sample_grads(loss, samples["train"]), per_sample_grads(loss, samples["test"])
    hess, ggn = hessian_and_ggn(loss, samples["hessian"])
    expected = agreement(influence(g, t, hess, 0.05), influence(g, t, ggn, 0.05), 3)
    assert out["agreement"]["ggn"]["whole_network"]["spearman"] == pytest.approx(expected["spearman"], abs=1e-10)
    assert out["agreement"]["hessian"]["whole_network"]["spearman"] == pytest.approx(1.0)
