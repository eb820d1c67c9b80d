import warnings

import pytest
import torch

from ifutils.curvature import (
    DenseCurvature,
    DiagonalCurvature,
    IdentityCurvature,
    LowRankCurvature,
    empirical_fisher,
    hessian_and_ggn,
    mc_true_fisher,
    token_empirical_fisher,
)
from ifutils.data import make_batch
from ifutils.grads import per_sample_grads, per_token_grads
from ifutils.subset import SubsetLoss, select_subset

from .conftest import (
    SUBSETS,
    enumerate_labels,
    random_sentences,
    subset_loss,
    tiny_model,
)


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


@pytest.mark.parametrize("kind", list(SUBSETS))
def test_structured_pass_token_ef_matches_per_token_gradients(model, sentences, kind):
    loss = subset_loss(model, kind)
    *_, ef = hessian_and_ggn(loss, sentences, chunk_size=4, token_ef=True)
    lengths = torch.tensor([len(s) for s in sentences])
    ref = token_empirical_fisher(per_token_grads(loss, sentences, desc=None), lengths)
    torch.testing.assert_close(ef.matrix, ref.matrix, rtol=1e-10, atol=1e-16)


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


def test_empirical_fisher_is_mean_outer_product(model, sentences):
    loss = subset_loss(model, "mixed")
    grads = per_sample_grads(loss, sentences, desc=None)
    lengths = torch.tensor([len(s) for s in sentences])
    ref = sum(len(s) * torch.outer(g, g) for s, g in zip(sentences, grads)) / len(sentences)
    torch.testing.assert_close(empirical_fisher(grads, lengths).matrix, ref, rtol=1e-12, atol=1e-16)


def test_monte_carlo_true_fisher_is_within_its_monte_carlo_bound():
    """F_k averages k i.i.d. draws of F_1, so E||F_k - G||_F^2 = E||F_1 - G||_F^2 / k with G = E F_1, both
    exact by enumerating every label sequence. Markov's inequality makes an error above 100x that a 1% event."""
    model = tiny_model(vocab=6, hidden=4)
    sentences = random_sentences(4, 6, max_len=2, seed=2)
    loss = subset_loss(model, "recurrent")
    n = len(sentences)

    def f_one(sentence, labels):
        inputs, _, mask = make_batch([sentence], 0)
        g = torch.func.grad(lambda th: loss.loss(th, inputs, labels[None], mask)[0])(loss.theta0)
        return len(sentence) * torch.outer(g, g) / n

    mean, var = enumerate_labels(loss, sentences, f_one)
    _, ggn = hessian_and_ggn(loss, sentences)
    torch.testing.assert_close(mean, ggn.matrix, rtol=1e-10, atol=1e-15)  # E F_1 = G (module docstring)
    k = 1024  # the bound is then 0.3 ||G||_F: a wrong scale (F or 0 instead of G) fails it
    assert 100 * var / k < 0.1 * (ggn.matrix**2).sum()
    err = ((mc_true_fisher(loss, sentences, k, seed=k).matrix - ggn.matrix) ** 2).sum()
    assert 0 < err <= 100 * var / k


def test_token_empirical_fisher_matches_a_loop_over_tokens(model, sentences):
    loss = subset_loss(model, "mixed")
    token_grads = per_token_grads(loss, sentences, chunk_size=4, desc=None)
    lengths = torch.tensor([len(s) for s in sentences])
    ref, start = 0, 0
    for s in sentences:
        inputs, targets, mask = make_batch([s], 0)
        for t in range(len(s)):
            g = torch.autograd.functional.jacobian(lambda th: loss.token_losses(th, inputs, targets)[0, t], loss.theta0)
            torch.testing.assert_close(token_grads[start + t], g, rtol=1e-10, atol=1e-14)
            ref = ref + torch.outer(g, g) / (len(s) * len(sentences))
        start += len(s)
    torch.testing.assert_close(token_empirical_fisher(token_grads, lengths).matrix, ref, rtol=1e-12, atol=1e-16)
    # a sentence's mean-loss gradient is the mean of its token gradients
    means = torch.stack([t.mean(0) for t in token_grads.split(lengths.tolist())])
    torch.testing.assert_close(means, per_sample_grads(loss, sentences, desc=None), rtol=1e-10, atol=1e-14)


class _Logits(torch.nn.Module):
    """(B, V, L) logits, the layout CrossEntropyLoss wants for sequences, from the wrapped LSTM LM."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, inputs):
        return self.lm(inputs, unrolled=True).transpose(1, 2)


@pytest.mark.parametrize("names", [["lstm.weight_hh_l0"], ["lstm.weight_ih_l0", "decoder.bias"]])
def test_whole_tensor_curvatures_match_curvlinops(names):
    """curvlinops' Hessian, GGN and EF operators, made dense, on a fixed-length batch: with
    reduction='mean' over all n*T tokens its objective is our (1/n) sum_i l_i, and its EF (one example per
    token, flattened outputs) is our token-level EF."""
    curvlinops = pytest.importorskip("curvlinops")
    model = tiny_model(vocab=7, emb=3, hidden=3)
    g = torch.Generator().manual_seed(4)
    sentences = [torch.cat([torch.randint(1, 7, (3,), generator=g), torch.tensor([0])]) for _ in range(5)]
    loss = SubsetLoss(model, select_subset(model, names), 0, torch.float64)
    inputs, targets, _ = make_batch(sentences, 0)
    wrapper = _Logits(model)
    params = [dict(wrapper.named_parameters())[f"lm.{n}"] for n in names]
    args = (wrapper, torch.nn.CrossEntropyLoss(), params, [(inputs, targets)])
    dense = lambda op: op(*args, check_deterministic=False) @ torch.eye(loss.theta0.numel(), dtype=torch.float64)  # noqa: E731
    hess, ggn = hessian_and_ggn(loss, sentences)
    lengths = torch.tensor([len(s) for s in sentences])
    ef = token_empirical_fisher(per_token_grads(loss, sentences, desc=None), lengths)
    for ours, op in ((hess, curvlinops.HessianLinearOperator), (ggn, curvlinops.GGNLinearOperator),
                     (ef, curvlinops.EFLinearOperator)):
        ref = dense(op)
        torch.testing.assert_close(ours.matrix, ref, rtol=1e-8, atol=1e-8 * ref.abs().max().item())


def test_woodbury_ef_solves_like_the_dense_ef(model, sentences):
    loss = subset_loss(model, "mixed")
    grads = per_sample_grads(loss, sentences, desc=None)
    lengths = torch.tensor([len(s) for s in sentences])
    dense, low = empirical_fisher(grads, lengths), LowRankCurvature.empirical_fisher(grads, lengths)
    assert low.nbytes < dense.nbytes and low.factor.shape == (loss.theta0.numel(), len(sentences))
    v = torch.randn(loss.theta0.numel(), 3, dtype=torch.float64)
    for damping in (1e-6, 1e-3, 1.0):
        torch.testing.assert_close(low.solve(v, damping), dense.solve(v, damping), rtol=1e-8, atol=0)
    torch.testing.assert_close(low.eigvalsh(), dense.eigvalsh(), rtol=0, atol=1e-12 * dense.eigvalsh().max().item())
    torch.testing.assert_close(low.mean_eigenvalue(), dense.mean_eigenvalue())
    with pytest.raises(ValueError, match="positive scalar damping"):
        low.solve(v, 0.0)


def test_block_diagonal_solves_block_by_block_with_per_block_damping(model, sentences):
    loss = subset_loss(model, "mixed")
    hess, ggn = hessian_and_ggn(loss, sentences)
    blocks = list(loss.blocks().values())
    assert len(blocks) > 2 and torch.equal(torch.cat(blocks).sort().values, torch.arange(ggn.p))
    block = ggn.block_diagonal(blocks)
    damping = block.relative_damping(10.0)
    v = torch.randn(ggn.p, dtype=torch.float64)
    x = block.solve(v, damping)
    for b, scale in zip(blocks, block.scales):
        torch.testing.assert_close(scale, float(ggn.matrix[b][:, b].diagonal().mean()))
        shifted = ggn.matrix[b[:, None], b] + 10.0 * scale * torch.eye(len(b), dtype=torch.float64)
        torch.testing.assert_close(x[b], torch.linalg.solve(shifted, v[b]), rtol=1e-10, atol=0)
    # a Hessian block with negative mean curvature has no relative scale, and says so
    with pytest.raises(ValueError, match="mean eigenvalue"):
        hess.block_diagonal(blocks).relative_damping(0.1)


def test_dense_solve_with_per_coordinate_damping():
    a = torch.randn(6, 6, dtype=torch.float64)
    c = DenseCurvature(a @ a.T - 3 * torch.eye(6, dtype=torch.float64), "indefinite")
    v = torch.randn(6, 2, dtype=torch.float64)
    for d in (torch.linspace(4, 9, 6, dtype=torch.float64), torch.linspace(0.01, 0.1, 6, dtype=torch.float64)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the small damping leaves C + D indefinite: eigen fallback
            x = c.solve(v, d)
        torch.testing.assert_close(x, torch.linalg.solve(c.matrix + torch.diag(d), v), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="damping tensor"):
        c.solve(v, -torch.ones(6, dtype=torch.float64))


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


def test_scale_damping_is_the_ggn_mean_eigenvalue_or_twice_the_negative_hessian_extreme():
    from ifutils.curvature import DenseCurvature, scale_damping

    ggn = DenseCurvature(torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64)), "G")
    assert scale_damping(DenseCurvature(torch.diag(torch.tensor([-0.5, 2.0], dtype=torch.float64)), "H"), ggn) == 2.0
    assert scale_damping(DenseCurvature(torch.diag(torch.tensor([-1.5, 2.0], dtype=torch.float64)), "H"), ggn) == 3.0
    assert scale_damping(DenseCurvature(torch.diag(torch.tensor([0.5, 2.0], dtype=torch.float64)), "H"), ggn, 0.1) == 0.2
