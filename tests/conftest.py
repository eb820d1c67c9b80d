"""Shared fixtures: a tiny float64 LSTM LM and random sentences, seeded."""

import http.server
import threading
from functools import partial

import pytest
import torch

from ifutils.data import make_batch
from ifutils.model import LSTMLM, ModelConfig
from ifutils.subset import SubsetLoss, select_subset

EOS = 0


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread for the test (restored after): bit-identical resumes are promised per thread count, and a
    multi-threaded BLAS on a loaded machine may partition a product differently between two runs. Subprocesses of
    such tests get ``ONE_THREAD_ENV``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_thread_env() -> dict:
    """The environment for a subprocess that must match a one-thread run bit for bit."""
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def random_sentences(n: int, vocab: int, max_len: int = 7, seed: int = 0) -> list[torch.Tensor]:
    """n sentences of 1..max_len words drawn from ids 1..vocab-1, each ending in <eos> (id 0)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g)
    return [torch.cat([torch.randint(1, vocab, (int(k),), generator=g), torch.tensor([EOS])]) for k in lengths]


def tiny_model(vocab: int = 13, emb: int = 5, hidden: int = 6, layers: int = 1, seed: int = 0) -> LSTMLM:
    torch.manual_seed(seed)
    return LSTMLM(ModelConfig(vocab, emb, hidden, layers, dropout=0.0)).double().eval()


def enumerate_labels(loss, sentences, contribution):
    """Exact mean and variance of a Monte Carlo estimator sum_i X_i(y_i) over labels y_i drawn from the model.

    Every label sequence y of sentence i (V^T_i of them; keep T_i and V tiny) is weighted by
    prod_t p_t(y_t), the model's probabilities with the real inputs. Returns (sum_i E X_i,
    sum_i E||X_i - E X_i||_F^2): draws of different sentences are independent, so the variances add.
    """
    import itertools

    mean, var = 0, 0.0
    for s in sentences:
        inputs, _, _ = make_batch([s], EOS)
        logp = torch.log_softmax(loss.logits(loss.theta0, inputs)[0], -1)
        labels = [torch.tensor(y) for y in itertools.product(range(logp.shape[-1]), repeat=len(s))]
        probs = [logp[torch.arange(len(s)), y].sum().exp() for y in labels]
        values = [contribution(s, y) for y in labels]
        m = sum(p * v for p, v in zip(probs, values))
        mean = mean + m
        var += float(sum(p * ((v - m) ** 2).sum() for p, v in zip(probs, values)))
    return mean, var


SUBSETS = {
    "recurrent": (["lstm.weight_hh_l0"], 20),
    "decoder": (["decoder.weight"], 15),
    "mixed": (["decoder.weight", "decoder.bias", "lstm.weight_hh_l0", "lstm.weight_ih_l0", "embedding.weight",
               "lstm.bias_hh_l0"], 40),
}


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def sentences():
    return random_sentences(9, 13)


def subset_loss(model: LSTMLM, kind: str, seed: int = 1) -> SubsetLoss:
    names, k = SUBSETS[kind]
    return SubsetLoss(model, select_subset(model, names, k, seed=seed), EOS, torch.float64)


@pytest.fixture
def http_root(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/served; yields (folder, base url)."""
    root = tmp_path / "served"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
