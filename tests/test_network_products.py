"""Whole-network exact reference (issue 14, item 3): operator products, matrix-free solves and extreme eigenvalues
against dense matrices of all parameters built independently (autograd Hessian, Jacobian-based GGN, through the
unrolled LSTM, while the operator runs the fused nn.LSTM on CPU)."""

import pytest
import torch
from torch.func import functional_call, jacrev

from ifutils.curvature.estimators import CurvatureProducts
from ifutils.curvature.inverse import SolverWarning
from ifutils.curvature.network_products import (
    NetworkOperator,
    NetworkOperatorCurvature,
    extreme_eigenvalues,
    network_operator,
    relative_residual,
)
from ifutils.data import make_batch
from ifutils.influence import influence
from ifutils.model import sentence_loss

from .conftest import EOS, random_sentences, tiny_model


@pytest.fixture(scope="module", params=[1, 2], ids=["layers1", "layers2"])
def dense(request):
    """Tiny float64 model (1 or 2 LSTM layers), 6 sentences; dense H and GGN of L = (1/n) sum_i l_i over all
    parameters, flattened in named_parameters order (P = 200 or 360)."""
    model, sents = tiny_model(vocab=7, emb=3, hidden=4, layers=request.param), random_sentences(6, 7, seed=2)
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def logits(theta, inputs):
        params = {k: x.view(s) for k, x, s in zip(names, theta.split([s.numel() for s in shapes]), shapes)}
        return functional_call(model, params, (inputs,), {"unrolled": True})

    def mean_loss(theta):
        return sum(sentence_loss(logits(theta, i), t, m)[0] for i, t, m in (make_batch([s], EOS) for s in sents)) \
            / len(sents)

    p, n = len(theta0), len(sents)
    hess = torch.autograd.functional.hessian(mean_loss, theta0, vectorize=True)
    ggn = torch.zeros(p, p, dtype=torch.float64)
    for s in sents:
        inputs, _, _ = make_batch([s], EOS)
        jac = jacrev(logits)(theta0, inputs)[0]  # (T, V, P)
        prob = torch.softmax(logits(theta0, inputs)[0], -1)
        lam = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]  # (T, V, V)
        ggn += torch.einsum("tvp,tvw,twq->pq", jac, lam, jac) / (len(s) * n)
    return model, sents, {"H": hess, "F": ggn}


def rhs(p, m, seed):
    return torch.randn(p, m, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("curvature", ["H", "F"])
def test_products_equal_dense_matrices(dense, curvature):
    model, sents, mats = dense
    products = CurvatureProducts(model, sents, EOS, batch_size=4)  # two length buckets: their sum is tested too
    v = rhs(products.p, 5, seed=3)
    assert products.p == len(mats[curvature])
    for vectorize in (True, False):
        op = NetworkOperator(products, curvature, block=2, vectorize=vectorize)  # blocks of 2, 2, 1 columns
        out = op(v)
        assert out.dtype == torch.float64 and out.shape == v.shape and op.matvecs == 5
        torch.testing.assert_close(out, mats[curvature] @ v, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(op(v[:, 0]), mats[curvature] @ v[:, 0], rtol=1e-10, atol=1e-13)
    # A float32 input is cast to the model's float64 (so only the input's rounding remains).
    v32 = v[:, 0].float()
    torch.testing.assert_close(op(v32), mats[curvature] @ v32.double(), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("curvature", ["H", "F"])
def test_cg_solves_equal_the_dense_damped_solve(dense, curvature):
    model, sents, mats = dense
    c = mats[curvature]
    evals = torch.linalg.eigvalsh(c)
    damping = float(max(0.0, -evals[0]) + 0.05 * evals[-1])  # above -lambda_min: C + damping I is positive definite
    op = network_operator(model, sents, EOS, curvature, batch_size=4)
    curv = NetworkOperatorCurvature(op, "cg", tol=1e-10)
    b = rhs(op.p, 2, seed=4)
    x = curv.solve(b, damping)
    expected = torch.linalg.solve(c + damping * torch.eye(len(c), dtype=torch.float64), b)
    torch.testing.assert_close(x, expected, rtol=1e-7, atol=1e-9)
    rec = curv.records[-1]
    assert curv.last_info is rec and len(curv.records) == 1
    assert rec["method"] == "cg" and rec["curvature"] == curvature and rec["columns"] == 2
    assert rec["name"] == ("hessian_cg" if curvature == "H" else "ggn") and curv.psd == (curvature == "F")
    assert 0 < rec["iterations"] <= 10 * op.p and rec["iterations"] == rec["solver_info"]["iterations"]
    assert rec["matvecs"] >= rec["iterations"]  # one product per running column and iteration
    dense_residual = ((c @ x + damping * x - b).norm(dim=0) / b.norm(dim=0)).tolist()
    assert rec["max_relative_residual"] < 1e-9
    assert rec["relative_residual"] == pytest.approx(dense_residual, abs=1e-12)


def test_influence_runs_on_the_whole_network_operator(dense):
    """influence() with the matrix-free Hessian equals -G_train (H + lambda I)^{-1} G_test^T with dense H."""
    model, sents, mats = dense
    h = mats["H"]
    damping = float(-torch.linalg.eigvalsh(h)[0]) + 0.1
    train = CurvatureProducts(model, sents, EOS).sentence_grads()
    test = CurvatureProducts(model, random_sentences(3, 7, seed=9), EOS).sentence_grads()
    curv = NetworkOperatorCurvature(network_operator(model, sents, EOS, "H"), "cg", tol=1e-11)
    scores = influence(train, test, curv, damping)
    expected = -train @ torch.linalg.solve(h + damping * torch.eye(len(h), dtype=torch.float64), test.T)
    torch.testing.assert_close(scores, expected, rtol=1e-7, atol=1e-10)
    assert curv.records[-1]["columns"] == 3 and curv.records[-1]["max_relative_residual"] < 1e-10


@pytest.mark.parametrize("curvature", ["H", "F"])
def test_lissa_and_arnoldi_solves(dense, curvature):
    model, sents, mats = dense
    if len(mats[curvature]) > 200:
        pytest.skip("the full-rank Arnoldi fit costs P products; one layer suffices")
    c = mats[curvature]
    evals = torch.linalg.eigvalsh(c)
    damping = float(max(0.0, -evals[0]) + 0.5 * evals[-1])
    b = rhs(len(c), 2, seed=5)
    expected = torch.linalg.solve(c + damping * torch.eye(len(c), dtype=torch.float64), b)
    op = network_operator(model, sents, EOS, curvature)
    top = float(evals[-1])
    lissa = NetworkOperatorCurvature(op, "lissa", scale=lambda d: 1.1 * (top + d), depth=150, tol=1e-9)
    torch.testing.assert_close(lissa.solve(b, damping), expected, rtol=1e-7, atol=1e-9)
    rec = lissa.records[-1]
    assert rec["iterations"] == 150 and not rec["solver_info"]["diverged"] and rec["max_relative_residual"] < 1e-8
    # Arnoldi with rank = P Ritz pairs is the exact inverse.
    arn = NetworkOperatorCurvature(op, "arnoldi", rank=len(c), num_iter=len(c), tol=1e-6)
    torch.testing.assert_close(arn.solve(b, damping), expected, rtol=1e-6, atol=1e-8)
    rec = arn.records[-1]
    assert rec["iterations"] == len(c) and rec["matvecs"] >= len(c) and rec["max_relative_residual"] < 1e-6
    before = op.matvecs
    arn.solve(b[:, 0], damping)  # the Ritz pairs are reused: only the residual check costs a product
    assert op.matvecs - before == 1 and arn.records[-1]["matvecs"] == 0


def test_extreme_eigenvalues_of_the_indefinite_hessian(dense):
    model, sents, mats = dense
    evals = torch.linalg.eigvalsh(mats["H"])
    lo, hi = float(evals[0]), float(evals[-1])
    assert lo < 0 < hi  # the tiny model is not at a minimum: H is indefinite
    op = network_operator(model, sents, EOS, "H", batch_size=4)
    below, above = -lo * 0.9, -lo * 1.1
    out = extreme_eigenvalues(op, op.p, tol=1e-10, max_matvecs=2000, seed=1, dampings=[0.0, below, above])
    assert out["lambda_max_converged"] and out["lambda_min_converged"]
    assert out["lambda_max"] == pytest.approx(hi, rel=1e-8)
    assert out["lambda_min"] == pytest.approx(lo, rel=1e-8)
    assert out["indefinite"] and out["pd_threshold"] == pytest.approx(-lo, rel=1e-8)
    assert out["min_pd_damping"] == out["pd_threshold"]
    assert 0 < out["matvecs"]["LA"] <= 2000 + 20 and 0 < out["matvecs"]["SA"] <= 2000 + 20
    for d in (0.0, below, above):
        entry = out["dampings"][repr(d)]
        dense_min = float(torch.linalg.eigvalsh(mats["H"] + d * torch.eye(len(evals), dtype=torch.float64))[0])
        assert entry["positive_definite"] == (dense_min > 0)
        assert entry["lambda_min_damped"] == pytest.approx(dense_min, rel=1e-7)
    assert out["dampings"][repr(above)]["condition_number"] == pytest.approx((hi + above) / (lo + above), rel=1e-6)
    assert out["dampings"][repr(0.0)]["condition_number"] == float("inf")


def test_extreme_eigenvalues_of_a_psd_matrix_and_non_convergence():
    a = torch.randn(40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    c = a @ a.T / 40
    evals = torch.linalg.eigvalsh(c)
    out = extreme_eigenvalues(lambda v: c @ v, 40, tol=1e-12, max_matvecs=2000)
    assert out["lambda_min"] == pytest.approx(float(evals[0]), rel=1e-8) and not out["indefinite"]
    assert out["min_pd_damping"] == 0.0
    with pytest.warns(SolverWarning, match="did not converge"):
        slow = extreme_eigenvalues(lambda v: c @ v, 40, tol=1e-14, max_matvecs=3)
    assert not slow["lambda_min_converged"]
    # Ritz values are inside the spectrum: a bound (or NaN when none converged), never beyond the extremes.
    assert not slow["lambda_min"] < float(evals[0]) - 1e-12 and not slow["lambda_max"] > float(evals[-1]) + 1e-12


def test_relative_residual_with_a_diagonal_damping():
    c = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x, b, d = rhs(6, 2, seed=6), rhs(6, 2, seed=7), torch.linspace(0.1, 0.6, 6, dtype=torch.float64)
    expected = ((c @ x + d[:, None] * x - b).norm(dim=0) / b.norm(dim=0)).tolist()
    assert relative_residual(lambda v: c @ v, x, b, d) == pytest.approx(expected, rel=1e-12)
    assert relative_residual(lambda v: c @ v, x[:, 0], b[:, 0], 0.5) == pytest.approx(
        [float((c @ x[:, 0] + 0.5 * x[:, 0] - b[:, 0]).norm() / b[:, 0].norm())], rel=1e-12)


def test_bad_input_is_refused(dense):
    model, sents, _ = dense
    products = CurvatureProducts(model, sents, EOS)
    with pytest.raises(ValueError, match="choose from"):
        NetworkOperator(products, "GN")
    with pytest.raises(ValueError, match="block"):
        NetworkOperator(products, "H", block=0)
    with pytest.raises(TypeError, match="CurvatureProducts"):
        NetworkOperator(model, "H")
    op = NetworkOperator(products, "F")
    with pytest.raises(ValueError, match=f"\\({products.p},\\)"):
        op(torch.zeros(products.p + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="choose one of"):
        NetworkOperatorCurvature(op, "newton")
    with pytest.raises(TypeError, match="rank"):
        NetworkOperatorCurvature(op, "arnoldi")
    with pytest.raises(TypeError, match="do not fit"):
        NetworkOperatorCurvature(op, "lissa", depth=10)  # scale missing
    with pytest.raises(NotImplementedError, match="extreme_eigenvalues"):
        NetworkOperatorCurvature(op).eigvalsh()
    with pytest.raises(ValueError, match="damping"):
        NetworkOperatorCurvature(op).solve(torch.zeros(products.p, dtype=torch.float64), -1.0)
    with pytest.raises(ValueError, match="dampings must be >= 0"):
        extreme_eigenvalues(op, products.p, dampings=[-1.0])
