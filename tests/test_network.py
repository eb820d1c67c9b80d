"""Whole-network per-sample gradients against an independent oracle: a loop of ``torch.autograd.grad`` over the
fused ``nn.LSTM`` path, one sentence at a time (float64)."""

import pytest
import torch

from ifutils.data import make_batch
from ifutils.model import sentence_loss
from ifutils.network import NetworkGrads, parameter_names
from tests.conftest import EOS, random_sentences, tiny_model


def loop_grads(model, sentences):
    """{name: (B, *shape)} by one backward pass per sentence through nn.LSTM (the oracle)."""
    params = dict(model.named_parameters())
    out = {n: [] for n in params}
    for s in sentences:
        inputs, targets, mask = make_batch([s], EOS)
        loss = sentence_loss(model(inputs), targets, mask).sum()
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            out[n].append(g)
    return {n: torch.stack(v) for n, v in out.items()}


@pytest.mark.parametrize("layers", [1, 2])
def test_every_tensor_equals_a_loop_of_autograd(layers):
    model = tiny_model(layers=layers)
    sentences = random_sentences(7, 13, max_len=6, seed=3)  # varied lengths: padding must not leak
    expected = loop_grads(model, sentences)
    got = NetworkGrads(model, EOS).batch_grads(sentences)
    assert set(got) == set(parameter_names(model))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)


def test_flat_layout_and_chunks_cover_every_sentence_once():
    model = tiny_model()
    sentences = random_sentences(9, 13, seed=4)
    names = ["decoder.weight", "lstm.weight_hh_l0"]
    net = NetworkGrads(model, EOS, names)
    expected = loop_grads(model, sentences)
    assert net.names == ["lstm.weight_hh_l0", "decoder.weight"]  # named_parameters order
    flat = torch.cat([expected[n].reshape(9, -1) for n in net.names], 1)
    assert net.p == flat.shape[1]
    seen = []
    for idx, g in net.chunks(sentences, chunk_size=4):
        torch.testing.assert_close(g, flat[idx], rtol=1e-10, atol=1e-12)
        seen += idx
    assert sorted(seen) == list(range(9))


def test_arguments_are_checked():
    model = tiny_model()
    with pytest.raises(ValueError, match="list of parameter names"):
        NetworkGrads(model, EOS, "decoder.weight")
    with pytest.raises(ValueError, match="valid names"):
        NetworkGrads(model, EOS, ["decoder.wieght"])
    with pytest.raises(TypeError, match="eos_id"):
        NetworkGrads(model, "<eos>")
    with pytest.raises(ValueError, match="chunk_size"):
        next(NetworkGrads(model, EOS).chunks(random_sentences(2, 13), 0))
    with pytest.raises(ValueError, match="eval"):
        NetworkGrads(model.train(), EOS)


def test_scores_against_queries_equal_flat_gradients_times_queries():
    model = tiny_model(layers=2)
    sentences = random_sentences(6, 13, seed=5)
    net = NetworkGrads(model, EOS)
    g = torch.Generator().manual_seed(0)
    queries = {n: torch.randn((3, *s), generator=g, dtype=torch.float64) for n, s in net.shapes.items()}
    flat_q = torch.cat([queries[n].reshape(3, -1) for n in net.names], 1)
    expected = net.flat(sentences) @ flat_q.T
    torch.testing.assert_close(net.dot(sentences, queries), expected, rtol=1e-10, atol=1e-12)
    buffer = torch.empty(10, net.p, dtype=torch.float64)
    torch.testing.assert_close(net.flat(sentences, buffer), net.flat(sentences))
    with pytest.raises(ValueError, match="missing"):
        net.dot(sentences, {"decoder.weight": queries["decoder.weight"]})
