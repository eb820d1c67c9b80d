"""KFAC and EK-FAC against the exact GGN/EF where they are exact, and their factors against brute-force loops
over tokens and autograd gradients of the full weight matrices."""

import pytest
import torch

from ifutils.curvature import empirical_fisher, hessian_and_ggn, kfac
from ifutils.curvature.kfac import (
    ekfac_curvature,
    fit_kfac,
    kfac_curvature,
    token_signals,
)
from ifutils.data import make_batch
from ifutils.grads import per_sample_grads
from ifutils.model import sentence_loss
from ifutils.subset import SubsetLoss, select_subset

from .conftest import EOS, enumerate_labels, random_sentences

LAYERS = ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_hh_l0", "decoder.weight"]


def make_loss(model, names, k=40, seed=1):
    return SubsetLoss(model, select_subset(model, names, k, seed=seed), EOS, torch.float64)


def full_weight_grad(model, name, sentence, target=None):
    """(out, in) gradient of the sentence NLL (sum over tokens) with respect to the whole tensor, by autograd
    through nn.LSTM, the reference for sum_t delta_t a_t^T."""
    inputs, targets, mask = make_batch([sentence], EOS)
    targets = targets if target is None else target
    param = dict(model.named_parameters())[name]
    nll = sentence_loss(model(inputs), targets, mask) * mask.sum()
    (g,) = torch.autograd.grad(nll.sum(), param)
    return g if g.dim() == 2 else g[:, None]


@pytest.mark.parametrize("name", ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0", "decoder.weight"])
def test_token_signals_sum_to_the_weight_gradient(model, sentences, name):
    loss = make_loss(model, [name], None)
    for s in sentences[:3]:
        inputs, targets, mask = make_batch([s], EOS)
        sig = token_signals(loss, loss.theta0, inputs, targets, mask)
        delta = sig["delta_logits" if name.startswith("decoder") else "delta_gates"][0]
        a = {"lstm.weight_ih_l0": sig["x"], "lstm.weight_hh_l0": sig["h_prev"], "decoder.weight": sig["h"]}.get(name)
        a = torch.ones(len(s), 1, dtype=torch.float64) if a is None else a[0]
        torch.testing.assert_close(delta.T @ a, full_weight_grad(model, name, s), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("build", [kfac_curvature, ekfac_curvature])
def test_kfac_equals_ggn_for_a_linear_layer_with_one_token(model, build):
    """One sample of one token: A (x) G = a a^T (x) Lambda is the exact GGN block (true-Fisher labels)."""
    loss = make_loss(model, ["decoder.weight"], 30)
    one = [torch.tensor([3])]
    _, ggn = hessian_and_ggn(loss, one)
    kfac = build(fit_kfac(loss, one), loss.theta0.numel())
    torch.testing.assert_close(kfac.matrix, ggn.matrix, rtol=1e-10, atol=1e-16)


@pytest.mark.parametrize("names", [["decoder.weight"], ["lstm.weight_ih_l0"], ["lstm.bias_ih_l0"], ["decoder.bias"]])
@pytest.mark.parametrize("build", [kfac_curvature, ekfac_curvature])
def test_empirical_kfac_equals_ef_for_one_token(model, names, build):
    """One token: the gradient is delta a^T exactly, so KFAC and EK-FAC with the real labels give the EF."""
    loss = make_loss(model, names, 12)
    one = [torch.tensor([3])]
    ef = empirical_fisher(per_sample_grads(loss, one, desc=None), torch.tensor([1]))
    kfac = build(fit_kfac(loss, one, labels="data"), loss.theta0.numel())
    torch.testing.assert_close(kfac.matrix, ef.matrix, rtol=1e-10, atol=1e-16)


def brute_force_factors(model, loss, layers, sentences):
    """A, G by loops over tokens, and EK-FAC eigenvalues from autograd per-sentence weight gradients."""
    n, out = len(sentences), {}
    for layer in layers:
        A = torch.zeros_like(layer.A)
        G = torch.zeros_like(layer.G)
        for s in sentences:
            inputs, targets, mask = make_batch([s], EOS)
            sig = token_signals(loss, loss.theta0, inputs, targets, mask)
            key = "delta_logits" if layer.name.startswith("decoder") else "delta_gates"
            act = {"lstm.weight_ih_l0": "x", "lstm.weight_hh_l0": "h_prev", "decoder.weight": "h"}.get(layer.name)
            for t in range(len(s)):
                a = sig[act][0, t, layer.in_cols] if act else torch.ones(1, dtype=torch.float64)
                d = sig[key][0, t, layer.out_rows]
                A += torch.outer(a, a) / (n * len(s))
                G += torch.outer(d, d) / (n * len(s))
        qg, qa = torch.linalg.eigh(G)[1], torch.linalg.eigh(A)[1]
        lam = sum((qg.T @ full_weight_grad(model, layer.name, s)[layer.out_rows][:, layer.in_cols] @ qa) ** 2
                  / (n * len(s)) for s in sentences)
        out[layer.name] = (A, G, lam)
    return out


def test_factors_and_eigenvalues_match_brute_force(model, sentences):
    loss = make_loss(model, LAYERS, 60)
    layers = fit_kfac(loss, sentences, labels="data", chunk_size=4)
    ref = brute_force_factors(model, loss, layers, sentences)
    assert {layer.name for layer in layers} == set(ref)
    for layer in layers:
        A, G, lam = ref[layer.name]
        torch.testing.assert_close(layer.A, A, rtol=1e-10, atol=1e-15)
        torch.testing.assert_close(layer.G, G, rtol=1e-10, atol=1e-15)
        torch.testing.assert_close(layer.eigenvalues, lam, rtol=1e-8, atol=1e-15)


def test_restricted_kfac_is_block_diagonal_and_per_layer_damped(model, sentences):
    loss = make_loss(model, LAYERS, 60)
    kfac = kfac_curvature(fit_kfac(loss, sentences, mc_samples=2, ekfac=False), 60)
    damping = kfac.relative_damping(0.1)
    for layer, scale in zip(kfac.layers, kfac.scales):
        torch.testing.assert_close(scale, float(torch.linalg.eigvalsh(torch.kron(layer.G, layer.A)).mean()))
        assert torch.all(damping[layer.positions] == 0.1 * scale)
    other = torch.ones(60, 60, dtype=torch.bool)
    for b in kfac.blocks:
        other[b[:, None], b] = False
    assert kfac.matrix[other].abs().max() == 0
    assert kfac.nbytes == sum((lay.A.numel() + lay.G.numel()) * 8 for lay in kfac.layers)


def test_kfac_refuses_parameters_it_does_not_cover(model, sentences):
    loss = make_loss(model, ["embedding.weight", "decoder.weight"], 20)
    with pytest.raises(ValueError, match="KFAC covers"):
        fit_kfac(loss, sentences)


def test_kfac_resumes_from_cache(model, sentences, tmp_path, monkeypatch):
    loss = make_loss(model, LAYERS, 60)
    first = fit_kfac(loss, sentences, mc_samples=2, cache_dir=tmp_path)

    def fail(*args):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(kfac, "_accumulate", fail)
    again = fit_kfac(loss, sentences, mc_samples=2, cache_dir=tmp_path)
    for a, b in zip(first, again):
        assert torch.equal(a.G, b.G) and torch.equal(a.eigenvalues, b.eigenvalues)
    assert len(list(tmp_path.glob("*/*.pt"))) == 2


def test_kfac_gate_factor_with_sampled_labels_is_within_its_monte_carlo_bound(model):
    """G of the gates with k label draws is an average of k i.i.d. draws of G_1, so
    E||G_k - E G||_F^2 = E||G_1 - E G||_F^2 / k exactly; E G and that variance come from enumerating every
    label sequence. Markov's inequality makes ||G_k - E G||_F^2 >= 100 var / k a 1% event (seeded here)."""
    loss = make_loss(model, ["lstm.weight_hh_l0"], 30)
    sents = random_sentences(3, 13, max_len=2, seed=3)
    layer = fit_kfac(loss, sents, labels="data", ekfac=False)[0]
    rows = layer.out_rows

    def g_one(sentence, labels):
        inputs, _, mask = make_batch([sentence], EOS)
        delta = token_signals(loss, loss.theta0, inputs, labels[None], mask)["delta_gates"][0][:, rows]
        return delta.T @ delta / (len(sents) * len(sentence))

    mean, var = enumerate_labels(loss, sents, g_one)
    k = 1024  # the bound is then about 0.3 ||E G||_F: a wrong scale (G or 0 instead of E G) fails it
    assert 100 * var / k < 0.1 * (mean**2).sum()
    est = fit_kfac(loss, sents, mc_samples=k, ekfac=False, seed=5)[0].G
    assert ((est - mean) ** 2).sum() <= 100 * var / k
    assert ((est - mean) ** 2).sum() > 0


@pytest.mark.parametrize("names", [["decoder.weight"], ["decoder.bias"], ["decoder.weight", "decoder.bias"]])
def test_decoder_ekfac_eigenvalues_are_the_exact_label_expectation(model, names):
    """With model labels the decoder's EK-FAC eigenvalues are an exact expectation over labels (module
    docstring): compare with enumerating every label sequence of multi-token sentences."""
    loss = make_loss(model, names, 12)
    sents = random_sentences(3, 13, max_len=2, seed=4)
    layers = fit_kfac(loss, sents)
    for layer in layers:
        q_g, q_a = layer.eigenbases()

        def projected(sentence, labels, layer=layer, q_g=q_g, q_a=q_a):
            grad = full_weight_grad(model, layer.name, sentence, labels[None])[layer.out_rows][:, layer.in_cols]
            return (q_g.T @ grad @ q_a) ** 2 / (len(sents) * len(sentence))

        mean, _ = enumerate_labels(loss, sents, projected)
        torch.testing.assert_close(layer.eigenvalues, mean, rtol=1e-9, atol=1e-18)
