import pytest
import torch

from ifutils.data import make_batch
from ifutils.model import LSTMLM, ModelConfig, sentence_loss, token_nll, unrolled_lstm

from .conftest import random_sentences, tiny_model


@pytest.mark.parametrize("layers", [1, 2])
def test_unrolled_lstm_equals_nn_lstm(layers):
    model = tiny_model(layers=layers)
    x = torch.randn(4, 9, 5, dtype=torch.float64)
    torch.testing.assert_close(unrolled_lstm(model.lstm, x), model.lstm(x)[0], rtol=0, atol=1e-12)


def test_unrolled_lstm_equals_nn_lstm_float32_trained_size():
    torch.manual_seed(1)
    model = LSTMLM(ModelConfig(50, 32, 64)).eval()
    inputs = torch.randint(0, 50, (3, 20))
    torch.testing.assert_close(model(inputs, unrolled=True), model(inputs), rtol=1e-4, atol=1e-5)


def test_padding_never_enters_the_loss():
    model = tiny_model()
    sents = random_sentences(5, 13)
    inputs, targets, mask = make_batch(sents, 0)
    base = sentence_loss(model(inputs), targets, mask)
    # Change every padded input and target: the per-sentence losses must not move.
    inputs2 = torch.where(mask, inputs, 7)
    targets2 = torch.where(mask, targets, 3)
    torch.testing.assert_close(sentence_loss(model(inputs2), targets2, mask), base, rtol=0, atol=0)
    # and each equals the loss of the sentence alone (batch of one, no padding)
    for i, s in enumerate(sents):
        one = make_batch([s], 0)
        torch.testing.assert_close(sentence_loss(model(one[0]), one[1], one[2])[0], base[i], rtol=0, atol=1e-14)


def test_token_nll_matches_cross_entropy():
    logits = torch.randn(3, 4, 11, dtype=torch.float64)
    targets = torch.randint(0, 11, (3, 4))
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), reduction="none")
    torch.testing.assert_close(token_nll(logits, targets).reshape(-1), ref)
