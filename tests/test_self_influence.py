"""Self-influence of every sentence against g_i^T solve(g_i) with per-sentence autograd gradients (float64)."""

import numpy as np
import pytest
import torch

from ifutils.curvature.base import DenseCurvature, IdentityCurvature
from ifutils.curvature.network_kfac import (
    diagonal_fisher,
    ekfac_network_curvature,
    fit_network_kfac,
    kfac_network_curvature,
)
from ifutils.network import NetworkGrads
from ifutils.self_influence import self_influence
from tests.conftest import EOS, random_sentences, tiny_model
from tests.test_datamodels import _flat_loop


@pytest.mark.parametrize("layers", [1, 2])
def test_every_curvature_equals_the_quadratic_form_of_its_solve(layers):
    model = tiny_model(layers=layers).eval()
    sentences = random_sentences(9, 13, max_len=6, seed=6)
    g = _flat_loop(model, sentences)
    net = NetworkGrads(model, EOS)
    factors = fit_network_kfac(model, sentences, EOS, labels="model", chunk_size=4, seed=0)
    ekfac, kfac = ekfac_network_curvature(factors), kfac_network_curvature(factors)
    diag = diagonal_fisher(model, sentences, EOS, labels="data", chunk_size=4)
    ident = IdentityCurvature(net.p)
    rng = torch.Generator().manual_seed(0)
    coords = torch.randperm(net.p, generator=rng)[:7]
    m = torch.randn(7, 7, generator=rng, dtype=torch.float64)
    dense = DenseCurvature(m @ m.T / 7, "subset_hessian", psd=True)
    dampings = [1e-3, 0.5]
    curvatures = {"ekfac": ekfac, "kfac": kfac, "ef_diag": diag, "identity": ident}
    out = self_influence(net, sentences, curvatures, {k: dampings for k in [*curvatures, "sub"]}, chunk_size=4,
                         restricted={"sub": (coords, dense)}, dtype=torch.float64)
    for key, c in curvatures.items():
        for j, d in enumerate(dampings):
            expected = (g * c.solve(g.T, d).T).sum(1).numpy()
            np.testing.assert_allclose(out[key][:, j], expected, rtol=1e-8, err_msg=f"{key} at {d}")
    gs = g[:, coords]
    np.testing.assert_allclose(out["sub"][:, 1], (gs * dense.solve(gs.T, 0.5).T).sum(1).numpy(), rtol=1e-10)
    np.testing.assert_allclose(out["grad_l2"][:, 0], (g * g).sum(1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(out["grad_l1"][:, 0], g.abs().sum(1).numpy(), rtol=1e-12)
    from ifutils.datamodels import KroneckerProjection

    proj = KroneckerProjection(net.shapes, 2, 2, seed=1, dtype=torch.float64)
    feats = self_influence(net, sentences, {}, {}, projection=proj, norms=False)["features"]
    np.testing.assert_allclose(feats, (g @ proj.matrix().T).numpy(), rtol=1e-5, atol=1e-7)
    # float32 rotations (the default) agree to single precision
    single = self_influence(net, sentences, {"ekfac": ekfac}, {"ekfac": dampings}, norms=False)
    np.testing.assert_allclose(single["ekfac"], out["ekfac"], rtol=1e-4)


def test_bad_arguments_are_refused():
    model = tiny_model().eval()
    net = NetworkGrads(model, EOS)
    sentences = random_sentences(3, 13, seed=1)
    with pytest.raises(ValueError, match="dampings"):
        self_influence(net, sentences, {"identity": IdentityCurvature(net.p)}, {})
    with pytest.raises(TypeError, match="DenseCurvature"):
        self_influence(net, sentences, {"d": DenseCurvature(torch.eye(net.p, dtype=torch.float64), "hessian")},
                       {"d": [0.1]})
    with pytest.raises(ValueError, match="P ="):
        self_influence(net, sentences, {"identity": IdentityCurvature(5)}, {"identity": [0.1]})
