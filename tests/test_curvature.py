import pytest
import torch

from ifutils.curvature import (
    DenseCurvature,
    DiagonalCurvature,
    IdentityCurvature,
    empirical_fisher,
    hessian_and_ggn,
    mc_true_fisher,
)
from ifutils.data import make_batch
from ifutils.grads import per_sample_grads

from .conftest import SUBSETS, random_sentences, subset_loss, tiny_model


def autograd_hessian(loss, sentences):
    inputs, targets, mask = make_batch(sentences, 0)
    return torch.autograd.functional.hessian(lambda th: loss.loss(th, inputs, targets, mask).mean(), loss.theta0)


def brute_force_ggn(loss, sentences):
    """(1/n) sum_i (1/T_i) sum_t Jz^T (diag p - p p^T) Jz with the full logit Jacobian, one sentence at a time."""
    total = 0
    for s in sentences:
        inputs, targets, mask = make_batch([s], 0)
        jz = torch.autograd.functional.jacobian(lambda th: loss.logits(th, inputs)[0], loss.theta0)  # (T, V, p)
        probs = torch.softmax(loss.logits(loss.theta0, inputs)[0], -1)
        lam = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
        total = total + torch.einsum("tvp,tvu,tuq->pq", jz, lam, jz) / len(s)
    return total / len(sentences)


@pytest.mark.parametrize("kind", list(SUBSETS))
def test_hessian_and_ggn_match_autograd(model, sentences, kind):
    loss = subset_loss(model, kind)
    hess, ggn = hessian_and_ggn(loss, sentences, chunk_size=4, token_chunk=3)
    torch.testing.assert_close(hess.matrix, autograd_hessian(loss, sentences), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(ggn.matrix, brute_force_ggn(loss, sentences), rtol=1e-10, atol=1e-14)


def test_weighted_hessian_matches_autograd(model, sentences):
    loss = subset_loss(model, "mixed")
    weights = torch.linspace(0, 2, len(sentences), dtype=torch.float64)
    hess, _ = hessian_and_ggn(loss, sentences, weights=weights)
    ref = sum(w * autograd_hessian(loss, [s]) for w, s in zip(weights, sentences)) / len(sentences)
    torch.testing.assert_close(hess.matrix, ref, rtol=1e-10, atol=1e-14)


def test_recurrent_hessian_differs_from_ggn(model, sentences):
    hess, ggn = hessian_and_ggn(subset_loss(model, "recurrent"), sentences)
    assert (hess.matrix - ggn.matrix).abs().max() > 1e-3 * hess.matrix.abs().max()
    assert ggn.eigvalsh().min() > -1e-14 * ggn.eigvalsh().max()


def test_decoder_hessian_equals_true_fisher(model, sentences):
    hess, ggn = hessian_and_ggn(subset_loss(model, "decoder"), sentences)
    torch.testing.assert_close(hess.matrix, ggn.matrix, rtol=1e-12, atol=1e-15)


def test_empirical_fisher_is_mean_outer_product(model, sentences):
    loss = subset_loss(model, "mixed")
    grads = per_sample_grads(loss, sentences, desc=None)
    lengths = torch.tensor([len(s) for s in sentences])
    ref = sum(len(s) * torch.outer(g, g) for s, g in zip(sentences, grads)) / len(sentences)
    torch.testing.assert_close(empirical_fisher(grads, lengths).matrix, ref, rtol=1e-12, atol=1e-16)


def test_monte_carlo_true_fisher_approaches_closed_form():
    model = tiny_model(vocab=6, hidden=4)
    sentences = random_sentences(6, 6, max_len=4)
    loss = subset_loss(model, "decoder")
    _, ggn = hessian_and_ggn(loss, sentences)
    err = {k: (mc_true_fisher(loss, sentences, k, seed=0).matrix - ggn.matrix).norm() / ggn.matrix.norm()
           for k in (4, 64, 1024)}
    assert err[1024] < err[64] < err[4]
    assert err[1024] < 0.06  # Monte Carlo error ~ 1/sqrt(k)


def test_dense_solve_matches_linalg_solve():
    a = torch.randn(7, 7, dtype=torch.float64)
    c = DenseCurvature(a @ a.T - 2 * torch.eye(7, dtype=torch.float64), "indefinite")
    v = torch.randn(7, 3, dtype=torch.float64)
    ref = torch.linalg.solve(c.matrix + 5.0 * torch.eye(7, dtype=torch.float64), v)
    torch.testing.assert_close(c.solve(v, 5.0), ref)
    torch.testing.assert_close(c.diagonal().solve(v, 5.0), v / (c.matrix.diagonal() + 5.0)[:, None])
    assert (c.eigvalsh() < 0).any()  # negative eigenvalues are kept, not clipped


def test_bad_damping_and_singular_curvature_are_reported():
    c = DiagonalCurvature(torch.tensor([0.0, 1.0, 2.0]), "psd")
    with pytest.raises(ValueError, match="damping must be >= 0"):
        c.solve(torch.ones(3), -1.0)
    with pytest.raises(ValueError, match="singular"):
        c.solve(torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="rows"):
        IdentityCurvature(4).solve(torch.ones(3), 0.1)
    with pytest.raises(FloatingPointError, match="rows \\[1\\]"):
        DenseCurvature(torch.tensor([[1.0, 0.0], [float("nan"), 1.0]]), "broken")
