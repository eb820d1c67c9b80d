"""Subset gradient sums, the Kronecker random projection and multi-shift CG against independent oracles: a loop of
``torch.autograd.grad`` per sentence, the dense Kronecker product, and dense solves (float64)."""

import warnings

import numpy as np
import pytest
import torch

from ifutils.curvature.inverse import SolverWarning
from ifutils.curvature.multishift import multishift_cg
from ifutils.datamodels import KroneckerProjection, fingerprint_weights, gradient_sums, subset_predictions
from ifutils.metrics import datamodel_score, linear_datamodeling_score
from ifutils.network import NetworkGrads
from tests.conftest import EOS, random_sentences, tiny_model
from tests.test_network import loop_grads


def _flat_loop(model, sentences):
    grads = loop_grads(model, sentences)
    return torch.cat([grads[n].reshape(len(sentences), -1) for n, _ in model.named_parameters()], 1)


def test_sums_unit_sums_norms_and_features_equal_a_per_sentence_loop():
    model = tiny_model(layers=2).eval()
    sentences = random_sentences(11, 13, max_len=6, seed=5)
    g = _flat_loop(model, sentences)  # (n, P) oracle
    net = NetworkGrads(model, EOS)
    rng = np.random.default_rng(0)
    masks = rng.random((4, len(sentences))) < 0.5
    proj = KroneckerProjection(net.shapes, k_out=3, k_in=2, seed=7, dtype=torch.float64)
    out = gradient_sums(net, sentences, masks, chunk_size=4, projection=proj)
    w = torch.tensor(masks, dtype=torch.float64)
    torch.testing.assert_close(out.sums, w @ g, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.unit_sums, w @ (g / g.norm(dim=1, keepdim=True)), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.sq_norms, (g * g).sum(1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.features.double(), (g @ proj.matrix().T), rtol=1e-5, atol=1e-7)  # float32 store
    assert out.n == len(sentences) and out.tokens == sum(len(s) for s in sentences)
    q = torch.randn(3, net.p, dtype=torch.float64)
    pred = subset_predictions(out.sums, q)
    scores = -(g @ q.T).numpy()  # I_iq = -g_i^T q
    np.testing.assert_allclose(pred, masks @ scores, rtol=1e-9, atol=1e-12)
    losses = pred[:, None, :] + rng.normal(size=(4, 2, 3))
    assert datamodel_score(pred, losses)["per_query"] == pytest.approx(
        linear_datamodeling_score(scores, masks, losses)["per_query"], abs=1e-12)


def test_projection_is_kronecker_per_tensor_and_preserves_inner_products_on_average():
    shapes = {"w": (6, 4), "b": (6,), "v": (3, 2, 2)}
    proj = KroneckerProjection(shapes, k_out=3, k_in=2, seed=1, dtype=torch.float64)
    assert proj.dim == 3 * 2 + 3 * 1 + 3 * 2 and proj.p == 24 + 6 + 12
    flat = torch.randn(5, proj.p, dtype=torch.float64)
    torch.testing.assert_close(proj(flat), flat @ proj.matrix().T)
    a, b = proj.factors["w"]
    torch.testing.assert_close(proj(flat)[:, :6], (a @ flat[:, :24].reshape(5, 6, 4) @ b.T).reshape(5, 6))
    # E[P^T P] = I: the mean over seeds of P^T P approaches the identity (Gaussian factors of variance 1/k)
    mean = sum(KroneckerProjection(shapes, 3, 2, seed=s, dtype=torch.float64).matrix().T
               @ KroneckerProjection(shapes, 3, 2, seed=s, dtype=torch.float64).matrix() for s in range(400)) / 400
    assert (mean - torch.eye(proj.p, dtype=torch.float64)).abs().max() < 0.35
    assert torch.diagonal(mean).mean() == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError, match="k_out and k_in"):
        KroneckerProjection(shapes, k_out=0)
    with pytest.raises(ValueError, match="flat gradients"):
        proj(flat[:, :-1])


def test_gradient_sums_rejects_bad_weights():
    model = tiny_model().eval()
    net = NetworkGrads(model, EOS)
    sentences = random_sentences(4, 13, seed=2)
    with pytest.raises(ValueError, match="weights must be"):
        gradient_sums(net, sentences, np.ones((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        gradient_sums(net, sentences, np.full((2, 4), np.nan))
    assert fingerprint_weights(np.eye(3)) != fingerprint_weights(np.eye(3)[::-1])


def _spd(p, seed, low=1e-3):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.logspace(np.log10(low), 0, p, dtype=torch.float64)) @ q.T


def test_multishift_cg_equals_a_dense_solve_at_every_damping():
    c = _spd(40, 0)
    b = torch.randn(40, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dampings = [1e-1, 1e-3, 1e-2, 1.0]
    xs, info = multishift_cg(lambda v: c @ v, b, dampings, tol=1e-10, max_iter=200)
    for d in dampings:
        exact = torch.linalg.solve(c + d * torch.eye(40, dtype=torch.float64), b)
        torch.testing.assert_close(xs[d], exact, rtol=1e-7, atol=1e-9)
        assert all(info[repr(d)]["converged"]) and max(info[repr(d)]["true_residual"]) < 1e-8
    # larger dampings are better conditioned and stop earlier; the base (smallest) runs longest
    its = {d: max(info[repr(d)]["iterations"]) for d in dampings}
    assert its[1.0] <= its[1e-1] <= its[1e-2] <= its[1e-3]
    assert info["base_damping"] == 1e-3


def test_multishift_cg_warns_when_short_of_tolerance_and_on_an_indefinite_base():
    c = _spd(40, 2, low=1e-4)
    b = torch.randn(40, dtype=torch.float64)
    with pytest.warns(SolverWarning, match="did not reach"):
        xs, info = multishift_cg(lambda v: c @ v, b, [1e-4, 1.0], tol=1e-10, max_iter=5)
    assert not info[repr(1e-4)]["converged"][0] and info[repr(1e-4)]["iterations"] == [5]
    exact = torch.linalg.solve(c + torch.eye(40, dtype=torch.float64), b)  # the well-conditioned shift is fine
    assert (xs[1.0] - exact).norm() / exact.norm() < 1e-3
    indefinite = c - 0.5 * torch.eye(40, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        with pytest.warns(SolverWarning, match="not positive definite"):
            multishift_cg(lambda v: indefinite @ v, b, [1e-3], max_iter=50)
    with pytest.raises(ValueError, match="distinct"):
        multishift_cg(lambda v: c @ v, b, [1e-2, 1e-2])


def test_an_exact_predictor_reaches_the_ceiling_for_the_mean_of_the_seeds_not_the_seed_to_seed_agreement():
    """losses = signal + seed noise (sd 0.8, S = 2): the exact predictor (the signal) scores LDS ~ sqrt(R_2) =
    sqrt(2 r / (1 + r)) (closed form, about 0.86 here), above the seed-to-seed agreement r (about 0.59)."""
    rng = np.random.default_rng(0)
    m, q = 400, 40
    signal = rng.normal(size=(m, q))
    losses = signal[:, None, :] + 0.8 * rng.normal(size=(m, 2, q))
    out = datamodel_score(signal, losses, resamples=200)
    rho = 1 / np.sqrt(1 + 0.32)  # Pearson of the signal with the two-seed mean (noise variance 0.64 / 2)
    assert out["lds"] == pytest.approx(6 / np.pi * np.arcsin(rho / 2), abs=0.02)  # Spearman of a Gaussian pair
    assert out["ceiling_mean_target"] == pytest.approx(out["lds"], abs=0.02)
    assert out["ceiling"] < out["lds"] - 0.2
    assert out["ci_two_way"][0] < out["lds"] < out["ci_two_way"][1]


def test_paired_lds_difference_equals_a_scipy_loop_and_its_crossed_draws_a_brute_force_loop():
    """The difference of two methods' LDS: per query from scipy.stats.spearmanr, its query interval
    scipy.stats.bootstrap's, its crossed interval a loop over the same draws (rows and columns resampled, Pearson of
    the ranks over all subsets by scipy.stats.pearsonr); identical methods differ by exactly 0, a clearly better one
    by an interval above 0."""
    from scipy import stats

    from ifutils.metrics import paired_lds_difference

    rng = np.random.default_rng(4)
    m, q = 40, 9
    truth = rng.normal(size=(m, q))
    losses = np.stack([truth + 0.6 * rng.normal(size=(m, q)) for _ in range(2)], 1)  # (M, S, Q)
    losses[5, 1, :] = np.nan  # an unfinished model: subset 5 is left out
    good, poor = truth + 0.3 * rng.normal(size=(m, q)), truth + 3.0 * rng.normal(size=(m, q))
    out = paired_lds_difference(good, poor, losses, seed=2, resamples=300)
    keep = np.arange(m) != 5
    actual = losses[keep].mean(1)
    rho = lambda p: np.array([stats.spearmanr(p[keep, j], actual[:, j])[0] for j in range(q)])  # noqa: E731
    diff = rho(good) - rho(poor)
    assert out["subsets"] == m - 1 and out["per_query"] == pytest.approx(diff.tolist(), abs=1e-12)
    assert out["difference"] == pytest.approx(diff.mean(), abs=1e-12)
    ref = stats.bootstrap((np.arange(q),), lambda i: diff[i.astype(int)].mean(), vectorized=False, n_resamples=300,
                          method="percentile", random_state=np.random.default_rng(2))
    assert out["ci"] == pytest.approx([ref.confidence_interval.low, ref.confidence_interval.high], abs=1e-12)
    ranks = {k: stats.rankdata(v, axis=0) for k, v in (("good", good[keep]), ("poor", poor[keep]), ("actual", actual))}
    draws, gen = [], np.random.default_rng(2)
    for _ in range(300):
        rows, cols = gen.integers(m - 1, size=m - 1), gen.integers(q, size=q)
        draws.append(np.mean([stats.pearsonr(ranks["good"][rows, c], ranks["actual"][rows, c])[0]
                              - stats.pearsonr(ranks["poor"][rows, c], ranks["actual"][rows, c])[0] for c in cols]))
    assert out["ci_two_way"] == pytest.approx(list(np.percentile(draws, [2.5, 97.5])), abs=1e-9)
    assert out["ci_two_way"][0] > 0  # 0.3 against 3.0 noise: the better method wins on every resample's mean
    same = paired_lds_difference(good, good, losses, resamples=50)
    assert same["difference"] == 0 and same["ci"] == [0, 0] and same["ci_two_way"] == [0, 0]
    with pytest.raises(ValueError, match="need predicted_a"):
        paired_lds_difference(good, poor[:-1], losses)
    with pytest.raises(ValueError, match="NaN or Inf"):
        paired_lds_difference(np.full_like(good, np.inf), poor, losses)
    with pytest.raises(ValueError, match="resamples"):
        paired_lds_difference(good, poor, losses, resamples=0)


def test_the_two_way_bootstrap_on_one_query_is_scipys_paired_bootstrap_of_the_rank_correlation():
    """One query: resampling queries does nothing, so the interval is scipy.stats.bootstrap's paired percentile
    interval of the Pearson correlation of the ranks (Monte Carlo error only)."""
    from scipy import stats

    from ifutils.metrics import two_way_bootstrap_ci

    rng = np.random.default_rng(1)
    a = rng.normal(size=(80, 1))
    b = a + rng.normal(size=(80, 1))
    ours = two_way_bootstrap_ci(a, b, seed=0, resamples=4000)
    ra, rb = stats.rankdata(a[:, 0]), stats.rankdata(b[:, 0])
    ref = stats.bootstrap((ra, rb), lambda x, y: np.corrcoef(x, y)[0, 1], paired=True, vectorized=False,
                          n_resamples=4000, method="percentile", random_state=np.random.default_rng(5))
    assert ours == pytest.approx([ref.confidence_interval.low, ref.confidence_interval.high], abs=0.02)
    with pytest.raises(ValueError, match="same"):
        two_way_bootstrap_ci(a, b[:-1])
    with pytest.raises(ValueError, match="resamples"):
        two_way_bootstrap_ci(a, b, resamples=0)
