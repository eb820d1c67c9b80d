"""Matrix-free iHVP solvers against explicit float64 oracles: dense autograd Hessians, torch.linalg.solve."""

import pytest
import torch

from ifutils.curvature import DenseCurvature, empirical_fisher, hessian_and_ggn
from ifutils.curvature.estimators import hutchinson, rademacher
from ifutils.curvature.inverse import (
    ArnoldiCurvature,
    DataInfCurvature,
    OperatorCurvature,
    SolverWarning,
    arnoldi,
    arnoldi_solve,
    conjugate_gradient,
    datainf,
    hvp_operator,
    lissa,
)
from ifutils.data import make_batch
from ifutils.influence import influence

from .conftest import subset_loss

P, DAMPING = 40, 0.1


def symmetric(eigenvalues, seed: int = 0) -> torch.Tensor:
    """Q diag(eigenvalues) Q^T with a seeded random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    return q @ torch.diag(eigenvalues.double()) @ q.T


def spd(p: int = P, cond: float = 100.0, seed: int = 0) -> torch.Tensor:
    """Positive definite, eigenvalues log-spaced in [1, cond]."""
    return symmetric(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), p), seed)


def rhs(p: int = P, m: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(p, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def explicit(a: torch.Tensor, b: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    return torch.linalg.solve(a + damping * torch.eye(len(a), dtype=torch.float64), b)


def dense_hessian(loss, sentences, theta):
    """Hessian of (1/n) sum_i l_i at theta by torch.autograd.functional.hessian, all sentences in one batch."""
    inputs, targets, mask = make_batch(sentences, 0)
    return torch.autograd.functional.hessian(lambda th: loss.loss(th, inputs, targets, mask).mean(), theta)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def matvec(a: torch.Tensor):
    return lambda v: a @ v


@pytest.mark.parametrize("kind", ["recurrent", "mixed"])
def test_hvp_operator_equals_dense_autograd_hessian(model, sentences, kind):
    loss = subset_loss(model, kind)
    p = len(loss.theta0)
    v, vs = torch.randn(p, dtype=torch.float64), torch.randn(p, 3, dtype=torch.float64)
    hess = dense_hessian(loss, sentences, loss.theta0)
    mv = hvp_operator(loss, sentences, chunk_size=4)
    torch.testing.assert_close(mv(v), hess @ v, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(mv(vs), hess @ vs, rtol=1e-10, atol=1e-14)
    theta = loss.theta0 + 0.1 * torch.randn(p, dtype=torch.float64)  # away from the trained point
    moved = hvp_operator(loss, sentences, chunk_size=3, theta=theta)
    torch.testing.assert_close(moved(vs), dense_hessian(loss, sentences, theta) @ vs, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match=f"\\({p},\\)"):
        mv(torch.ones(p + 1))


@pytest.mark.parametrize("columns", [None, 3])
def test_conjugate_gradient_matches_explicit_solve(columns):
    a, b = spd(), (rhs()[:, 0] if columns is None else rhs(m=columns))
    x, info = conjugate_gradient(matvec(a), b, DAMPING)
    assert x.shape == b.shape and all(info["converged"]) and info["iterations"] <= 2 * P
    assert relative_error(x, explicit(a, b)) < 1e-4


def test_conjugate_gradient_per_coordinate_damping_and_zero_column():
    a, b = spd(), rhs()
    b[:, 1] = 0
    d = torch.linspace(0.1, 2.0, P, dtype=torch.float64)
    x, _ = conjugate_gradient(matvec(a), b, d)
    assert relative_error(x, torch.linalg.solve(a + torch.diag(d), b)) < 1e-4
    assert (x[:, 1] == 0).all()


def test_conjugate_gradient_warns_when_it_cannot_converge():
    a, b = spd(), rhs()
    with pytest.warns(SolverWarning, match="did not reach relative residual"):
        _, info = conjugate_gradient(matvec(a), b, DAMPING, max_iter=3)
    assert not any(info["converged"])
    indefinite = symmetric(torch.linspace(-1.0, 1.0, P) + 0.013)  # eigenvalues of both signs, none at 0
    with pytest.warns(SolverWarning, match="not positive definite"):
        _, info = conjugate_gradient(matvec(indefinite), b, 0.0)
    assert info["nonpositive_curvature"] == [0, 1, 2]


def test_lissa_matches_explicit_solve():
    a, b = spd(cond=10.0), rhs()
    scale = 1.1 * (10.0 + DAMPING)  # above lambda_max(A + damping I): error shrinks by 1 - 1/11 per step
    x, info = lissa(matvec(a), b, DAMPING, scale=scale, depth=400, repeats=5)
    assert info["repeats"] == 1 and not info["diverged"]  # deterministic repeats are identical: run once
    assert relative_error(x, explicit(a, b)) < 1e-4
    d = torch.linspace(0.1, 1.0, P, dtype=torch.float64)
    x, _ = lissa(matvec(a), b, d, scale=scale, depth=400)
    assert relative_error(x, torch.linalg.solve(a + torch.diag(d), b)) < 1e-4


def test_lissa_with_stochastic_products_is_seeded_and_unbiased():
    a, b = spd(p=10, cond=10.0), rhs(p=10, m=1)
    noise = symmetric(torch.linspace(-1.0, 1.0, 10), seed=3)

    def sample_mv(v, generator):  # A +- noise with equal probability: an unbiased estimate of A v
        sign = 1.0 if torch.rand((), generator=generator) < 0.5 else -1.0
        return (a + sign * noise) @ v

    options = {"scale": 15.0, "depth": 120, "repeats": 100, "tol": 1.0, "sample_mv": sample_mv}
    x, info = lissa(matvec(a), b, DAMPING, seed=0, **options)
    assert info["repeats"] == 100
    torch.testing.assert_close(lissa(matvec(a), b, DAMPING, seed=0, **options)[0], x, rtol=0, atol=0)
    assert not torch.equal(lissa(matvec(a), b, DAMPING, seed=1, **options)[0], x)
    single = lissa(matvec(a), b, DAMPING, **{**options, "repeats": 1})[0]
    ref = explicit(a, b)
    assert relative_error(x, ref) < 0.05 and relative_error(x, ref) < relative_error(single, ref)


def test_lissa_warns_on_divergence_and_on_too_small_depth():
    a, b = spd(cond=10.0), rhs()
    with pytest.warns(SolverWarning, match="diverged"):
        _, info = lissa(matvec(a), b, DAMPING, scale=3.0, depth=200)  # scale < lambda_max / 2
    assert info["diverged"] and info["depth"] < 200  # stopped before overflowing
    with pytest.warns(SolverWarning, match="did not converge in depth=5"):
        lissa(matvec(a), b, DAMPING, scale=11.0, depth=5)


def test_arnoldi_full_rank_recovers_spectrum_and_solve():
    eigenvalues = torch.logspace(0, 2, P, dtype=torch.float64)
    a, b = symmetric(eigenvalues), rhs()
    evals, evecs, info = arnoldi(matvec(a), P, rank=P)
    torch.testing.assert_close(evals, eigenvalues.flip(0), rtol=1e-10, atol=0)  # decreasing |e|
    torch.testing.assert_close(evecs.T @ evecs, torch.eye(P, dtype=torch.float64), rtol=0, atol=1e-12)
    assert max(info["ritz_residual"]) < 1e-10
    for complement in (True, False):
        x, _ = arnoldi_solve(evals, evecs, b, DAMPING, complement)
        assert relative_error(x, explicit(a, b)) < 1e-4


def test_arnoldi_on_exactly_low_rank_matrix():
    r = 5
    g = torch.Generator().manual_seed(4)
    factor = torch.randn(P, r, generator=g, dtype=torch.float64)
    a, b = factor @ factor.T, rhs()
    evals, evecs, info = arnoldi(matvec(a), P, rank=r)  # the Krylov space closes after r + 1 vectors
    assert info["restarts"] > 0
    torch.testing.assert_close(evals, torch.linalg.eigvalsh(a).flip(0)[:r], rtol=1e-10, atol=0)
    x, _ = arnoldi_solve(evals, evecs, b, DAMPING, complement=True)
    assert relative_error(x, explicit(a, b)) < 1e-4
    projected, info = arnoldi_solve(evals, evecs, b, DAMPING, complement=False)  # Schioppa et al.'s projection
    torch.testing.assert_close(projected, evecs @ torch.diag(1 / (evals + DAMPING)) @ evecs.T @ b)
    assert min(info["outside_fraction"]) > 0.5  # most of a random b lies outside the rank-5 span


def test_arnoldi_warns_on_unresolved_pairs_and_rejects_bad_sizes():
    a = symmetric(torch.linspace(1.0, 2.0, 60))  # no spectral gap: 12 iterations cannot resolve the top 10
    with pytest.warns(SolverWarning, match="unresolved"):
        _, _, info = arnoldi(matvec(a), 60, rank=10, num_iter=12)
    assert max(info["ritz_residual"]) > 1e-2
    with pytest.raises(ValueError, match="rank <= num_iter"):
        arnoldi(matvec(a), 60, rank=10, num_iter=5)
    evals, evecs, _ = arnoldi(matvec(spd()), P, rank=3, num_iter=P)
    with pytest.raises(ValueError, match="damping > 0 or complement=False"):
        arnoldi_solve(evals, evecs, rhs(), 0.0)


def ef_problem(n: int, p: int = 30, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(n, p, generator=g, dtype=torch.float64) / 3
    lengths = torch.randint(1, 20, (n,), generator=g)
    return grads, lengths


def test_datainf_equals_mean_of_per_sample_solves():
    grads, lengths = ef_problem(8)
    b = rhs(p=30)
    x, info = datainf(grads, b, DAMPING, lengths)
    eye = torch.eye(30, dtype=torch.float64)
    ref = sum(torch.linalg.solve(w * torch.outer(g, g) + DAMPING * eye, b) for g, w in zip(grads, lengths)) / 8
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=0)
    assert info["n"] == 8
    one, _ = datainf(grads[:1], b[:, 0], DAMPING, lengths[:1])  # n = 1: the swap is exact
    ef_one = empirical_fisher(grads[:1], lengths[:1]).matrix
    torch.testing.assert_close(one, explicit(ef_one, b[:, 0]), rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="damping > 0"):
        datainf(grads, b, 0.0, lengths)


def test_wrappers_give_the_dense_influence():
    a = spd(p=30, cond=10.0)
    g = torch.Generator().manual_seed(6)
    train = torch.randn(20, 30, generator=g, dtype=torch.float64)
    test = torch.randn(4, 30, generator=g, dtype=torch.float64)
    dense = influence(train, test, DenseCurvature(a, "A"), DAMPING)
    wrappers = [
        OperatorCurvature(matvec(a), 30, "A (CG)"),
        OperatorCurvature(matvec(a), 30, "A (LiSSA)", method="lissa", scale=11.0, depth=400),
        ArnoldiCurvature(matvec(a), 30, rank=30),
    ]
    for curvature in wrappers:
        torch.testing.assert_close(influence(train, test, curvature, DAMPING), dense, rtol=1e-6, atol=0)
    torch.testing.assert_close(wrappers[2].eigvalsh(), torch.linalg.eigvalsh(a), rtol=1e-10, atol=0)
    d = torch.linspace(0.1, 1.0, 30, dtype=torch.float64)
    torch.testing.assert_close(wrappers[0].solve(test.T, d), torch.linalg.solve(a + torch.diag(d), test.T))
    for curvature in wrappers[2:]:
        with pytest.raises(ValueError, match="scalar damping"):
            curvature.solve(test.T, d)


def test_datainf_curvature_influence_and_spectrum():
    for n in (1, 7, 45):  # n = 1: exact; n < p and n > p: Gram eigenvalues padded or cut to p
        grads, lengths = ef_problem(n)
        ef, approx = empirical_fisher(grads, lengths), DataInfCurvature(grads, lengths)
        torch.testing.assert_close(approx.eigvalsh(), ef.eigvalsh(), rtol=1e-10, atol=1e-12)
        assert approx.mean_eigenvalue() == pytest.approx(ef.mean_eigenvalue(), rel=1e-12)
    test = rhs(p=30, m=4).T
    grads, lengths = ef_problem(1)
    approx = DataInfCurvature(grads, lengths)
    torch.testing.assert_close(influence(grads, test, approx, DAMPING),
                               influence(grads, test, empirical_fisher(grads, lengths), DAMPING))
    with pytest.raises(ValueError, match="scalar damping"):
        approx.solve(test.T, torch.ones(30))


def test_operator_curvature_trace_and_errors():
    a = spd(p=30, cond=10.0)
    assert OperatorCurvature(matvec(a), 30, "A", trace=60.0).mean_eigenvalue() == 2.0
    diagonal = torch.diag(torch.linspace(1.0, 3.0, 30, dtype=torch.float64))
    assert hutchinson(matvec(diagonal), rademacher(3, 30, 0), block=2)["trace"] == pytest.approx(60.0, rel=1e-14)  # exact for diagonal C
    off = a - torch.diag(a.diagonal())
    std = (2 * (off**2).sum() / 2000).sqrt()  # Hutchinson's standard error with Rademacher probes
    assert abs(hutchinson(matvec(a), rademacher(2000, 30, 0), block=8)["trace"] - a.trace()) < 4 * std
    operator = OperatorCurvature(matvec(a), 30, "A", probes=2000)
    assert operator.relative_damping(0.1) == pytest.approx(0.1 * float(a.trace()) / 30, rel=0.05)
    with pytest.raises(NotImplementedError, match="form the matrix"):
        operator.eigvalsh()
    with pytest.raises(TypeError, match="scale"):
        OperatorCurvature(matvec(a), 30, "A", method="lissa", depth=10)
    with pytest.raises(ValueError, match="unknown method"):
        OperatorCurvature(matvec(a), 30, "A", method="newton")


def test_operator_curvature_on_hvp_matches_structured_hessian(model, sentences):
    loss = subset_loss(model, "recurrent")
    hess, _ = hessian_and_ggn(loss, sentences)
    damping = 1.0 + abs(float(hess.eigvalsh()[0]))  # positive definite, so CG applies
    grads = torch.randn(6, hess.p, dtype=torch.float64)
    operator = OperatorCurvature(hvp_operator(loss, sentences), hess.p, "hessian_cg")
    torch.testing.assert_close(influence(grads, grads[:2], operator, damping),
                               influence(grads, grads[:2], hess, damping), rtol=1e-8, atol=1e-12)
