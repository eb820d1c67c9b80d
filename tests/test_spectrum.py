"""Matrix-free curvature products and spectrum statistics against dense matrices built independently."""

import pytest
import scipy.linalg
import torch
from torch.func import functional_call, jacrev

from ifutils.curvature.estimators import (
    CurvatureProducts,
    hutchinson,
    lambda_max,
    rademacher,
)
from ifutils.data import make_batch
from ifutils.experiments.spectrum import spectrum_stats
from ifutils.model import sentence_loss

from .conftest import EOS, random_sentences, tiny_model

NAMES = ["lstm.weight_hh_l0", "decoder.weight", "embedding.weight"]


@pytest.fixture(scope="module")
def dense():
    """Tiny float64 model, 6 sentences; H, GGN and EF of L = (1/n) sum_i l_i over all P = 207 parameters."""
    model, sents = tiny_model(vocab=7, emb=3, hidden=4), random_sentences(6, 7, seed=2)
    names = [k for k, _ in model.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def unflat(theta):
        return {k: x.view(s) for k, x, s in zip(names, theta.split([s.numel() for s in shapes]), shapes)}

    def logits(theta, inputs):
        return functional_call(model, unflat(theta), (inputs,), {"unrolled": True})

    def loss_i(theta, s):
        inputs, targets, mask = make_batch([s], EOS)
        return sentence_loss(logits(theta, inputs), targets, mask)[0]

    n, p = len(sents), len(theta0)
    hess = torch.autograd.functional.hessian(lambda t: sum(loss_i(t, s) for s in sents) / n, theta0,
                                            vectorize=True)
    ggn, ef = torch.zeros(p, p, dtype=torch.float64), torch.zeros(p, p, dtype=torch.float64)
    for s in sents:
        inputs, _, _ = make_batch([s], EOS)
        jac = jacrev(logits)(theta0, inputs)[0]  # (T, V, P)
        prob = torch.softmax(logits(theta0, inputs)[0], -1)
        for t in range(len(s)):
            lam = torch.diag(prob[t]) - torch.outer(prob[t], prob[t])
            ggn += jac[t].T @ lam @ jac[t] / (len(s) * n)
        theta = theta0.clone().requires_grad_()
        g = torch.autograd.grad(loss_i(theta, s), theta)[0]
        ef += torch.outer(g, g) / n
    return model, sents, {"H": hess, "F": ggn, "EF": ef}


@pytest.mark.parametrize("curvature", ["F", "H", "EF"])
def test_products_equal_dense_matrices(dense, curvature):
    model, sents, mats = dense
    ops = CurvatureProducts(model, sents, EOS, batch_size=4)  # two batches: the sum over batches is tested too
    v = torch.randn(ops.p, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert ops.p == len(mats[curvature])
    torch.testing.assert_close(ops.matvec(curvature)(v), mats[curvature] @ v, rtol=1e-10, atol=1e-13)


def test_named_parameters_give_the_sub_block(dense):
    model, sents, mats = dense
    ops = CurvatureProducts(model, sents, EOS, names=NAMES)
    offsets = {k: 0 for k in NAMES}
    start = 0
    for k, p in model.named_parameters():
        offsets[k] = (start, start + p.numel())
        start += p.numel()
    idx = torch.cat([torch.arange(*offsets[k]) for k in NAMES])
    v = torch.randn(ops.p, dtype=torch.float64)
    torch.testing.assert_close(ops.matvec("H")(v), mats["H"][idx][:, idx] @ v, rtol=1e-10, atol=1e-13)


def test_hutchinson_is_exact_when_probes_are_hadamard_rows():
    """(1/K) sum_k v_k v_k^T = I for the rows of a Hadamard matrix, so both estimates are exact."""
    a = torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    c = a + a.T
    out = hutchinson(lambda v: c @ v, torch.tensor(scipy.linalg.hadamard(8), dtype=torch.float64))
    assert out["mean"] == pytest.approx(float(c.trace()) / 8, rel=1e-12)
    assert out["second_moment"] == pytest.approx(float((c @ c).trace()) / 8, rel=1e-12)


def test_hutchinson_averages_the_probe_quadratic_forms():
    c = torch.randn(5, 5, dtype=torch.float64).tril()
    c = c + c.T
    probes = rademacher(7, 5, seed=1)
    out = hutchinson(lambda v: c @ v, probes)
    q = torch.einsum("kp,pq,kq->k", probes, c, probes)
    r = (probes @ c).square().sum(1)
    assert out["mean"] == pytest.approx(float(q.mean()) / 5, rel=1e-12)
    assert out["mean_se"] == pytest.approx(float(q.std()) / 7**0.5 / 5, rel=1e-12)
    assert out["second_moment"] == pytest.approx(float(r.mean()) / 5, rel=1e-12)
    assert set(probes.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("curvature", ["F", "H", "EF"])
def test_stats_match_the_dense_spectrum(dense, curvature):
    model, sents, mats = dense
    evals = torch.linalg.eigvalsh(mats[curvature])
    p = len(evals)
    out = spectrum_stats(model, sents, EOS, (curvature,), probes=32, tol=1e-12, max_matvecs=1000)[curvature]
    assert out["lanczos_converged"]
    assert out["lambda_max"] == pytest.approx(float(evals[-1]), rel=1e-6)
    # Statistical, but deterministic (seeded probes): within 4 standard errors of the truth.
    assert out["P"] == p and out["n"] == len(sents) and out["probes"] == 32
    assert abs(out["mean"] - float(evals.sum()) / p) < 4 * out["mean_se"]
    assert abs(out["second_moment"] - float(evals.square().sum()) / p) < 4 * out["second_moment_se"]
    if curvature == "EF":
        exact = out["exact"]
        assert exact["mean"] == pytest.approx(float(evals.sum()) / p, rel=1e-10)
        assert exact["second_moment"] == pytest.approx(float(evals.square().sum()) / p, rel=1e-10)
        assert exact["lambda_max"] == pytest.approx(float(evals[-1]), rel=1e-10)


def test_lambda_max_reports_non_convergence():
    c = torch.diag(torch.linspace(0, 1, 200, dtype=torch.float64))
    out = lambda_max(lambda v: c @ v, 200, tol=1e-14, max_matvecs=5)
    assert not out["lanczos_converged"] and not out["lambda_max"] > 1 + 1e-12  # a lower bound, or NaN


def test_bad_input_is_refused(dense):
    model, sents, _ = dense
    with pytest.raises(ValueError, match="no sentences"):
        CurvatureProducts(model, [], EOS)
    with pytest.raises(ValueError, match="valid names"):
        CurvatureProducts(model, sents, EOS, names=["lstm.weight_hh_l9"])
    with pytest.raises(ValueError, match="probes must be >= 1"):
        spectrum_stats(model, sents, EOS, probes=0)
    with pytest.raises(ValueError, match="choose from"):
        spectrum_stats(model, sents, EOS, ("GN",))
    with pytest.raises(ValueError, match="training mode"):
        CurvatureProducts(model.train(), sents, EOS)
    model.eval()
