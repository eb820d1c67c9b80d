"""Shared fixtures: a tiny float64 LSTM LM and random sentences, seeded."""

import http.server
import threading
from functools import partial

import pytest
import torch

from ifutils.grads import SubsetLoss, select_subset
from ifutils.model import LSTMLM, ModelConfig

EOS = 0


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_sentences(n: int, vocab: int, max_len: int = 7, seed: int = 0) -> list[torch.Tensor]:
    """n sentences of 1..max_len words drawn from ids 1..vocab-1, each ending in <eos> (id 0)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g)
    return [torch.cat([torch.randint(1, vocab, (int(k),), generator=g), torch.tensor([EOS])]) for k in lengths]


def tiny_model(vocab: int = 13, emb: int = 5, hidden: int = 6, layers: int = 1, seed: int = 0) -> LSTMLM:
    torch.manual_seed(seed)
    return LSTMLM(ModelConfig(vocab, emb, hidden, layers, dropout=0.0)).double().eval()


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
