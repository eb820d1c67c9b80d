import pytest
import torch

from ifutils.data import make_batch
from ifutils.grads import per_sample_grads
from ifutils.subset import default_subset, select_subset

from .conftest import SUBSETS, subset_loss


@pytest.mark.parametrize("kind", list(SUBSETS))
def test_per_sample_grads_equal_autograd_loop(model, sentences, kind):
    loss = subset_loss(model, kind)
    got = per_sample_grads(loss, sentences, chunk_size=4, desc=None)
    for i, s in enumerate(sentences):
        theta = loss.theta0.clone().requires_grad_(True)
        inputs, targets, mask = make_batch([s], 0)
        (ref,) = torch.autograd.grad(loss.loss(theta, inputs, targets, mask).sum(), theta)
        torch.testing.assert_close(got[i], ref, rtol=1e-12, atol=1e-14)


def test_subset_coordinates_are_the_model_parameters(model):
    loss = subset_loss(model, "mixed")
    params = dict(model.named_parameters())
    for name in loss.subset.names:
        start = loss._offsets[name]
        idx = loss.subset.indices[name]
        torch.testing.assert_close(loss.theta0[start:start + len(idx)], params[name].detach().flatten()[idx])
    # the substituted parameters reproduce the model exactly at theta0
    inputs = torch.randint(0, 13, (2, 6))
    torch.testing.assert_close(loss.logits(loss.theta0, inputs), model(inputs), rtol=0, atol=1e-12)


def test_subset_is_seeded_and_sized(model):
    a = select_subset(model, ["lstm.weight_hh_l0", "decoder.weight"], 30, seed=3)
    b = select_subset(model, ["lstm.weight_hh_l0", "decoder.weight"], 30, seed=3)
    assert a.size == 30 and all(torch.equal(a.indices[n], b.indices[n]) for n in a.names)
    assert default_subset(model, "recurrent", 20).names == ["lstm.weight_hh_l0"]


@pytest.mark.parametrize("names, k, error, text", [
    (["lstm.weight_xx"], None, KeyError, "lstm.weight_xx"),
    ([], None, ValueError, "empty"),
    (["decoder.bias"], 10_000, ValueError, "num_coords=10000"),
])
def test_bad_subsets_are_named(model, names, k, error, text):
    with pytest.raises(error, match=text):
        select_subset(model, names, k)


def test_sampled_labels_are_seeded(model, sentences):
    loss = subset_loss(model, "recurrent")
    a = per_sample_grads(loss, sentences, chunk_size=4, sampled_labels=5, desc=None)
    b = per_sample_grads(loss, sentences, chunk_size=4, sampled_labels=5, desc=None)
    c = per_sample_grads(loss, sentences, chunk_size=4, sampled_labels=6, desc=None)
    real = per_sample_grads(loss, sentences, desc=None)
    assert torch.equal(a, b) and not torch.allclose(a, c) and not torch.allclose(a, real)


def test_non_finite_gradients_name_the_samples(model, sentences):
    loss = subset_loss(model, "recurrent")
    with torch.no_grad():  # NaN weights are refused by SubsetLoss (tests/test_errors.py): set one behind its back
        loss.model.embedding.weight[sentences[2][0]] = float("nan")
    with pytest.raises(FloatingPointError, match="samples \\[.*2"):
        per_sample_grads(loss, sentences, desc=None)
