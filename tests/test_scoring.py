"""Streamed whole-network scoring (ifutils.scoring): values against a loop of torch.autograd.grad, resume after a
simulated kill against an uninterrupted run (bit for bit), refusal of another configuration, argument checks."""

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call, jvp

from ifutils import scoring
from ifutils.data import make_batch
from ifutils.model import sentence_loss
from ifutils.network import parameter_names
from ifutils.scoring import chunk_scores, load_scores, query_dict, score_all

from .conftest import EOS, one_thread_env, random_sentences, tiny_model

SUBSET = ["lstm.weight_hh_l0", "embedding.weight", "decoder.bias"]


def loop_grads(model, sentences, names):
    """(n, P) oracle: one torch.autograd.grad per sentence through the fused nn.LSTM, flattened in names order."""
    params = dict(model.named_parameters())
    chosen = [n for n in parameter_names(model) if n in set(names)]
    rows = []
    for s in sentences:
        inputs, targets, mask = make_batch([s], EOS)
        loss = sentence_loss(model(inputs), targets, mask)[0]
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [params[n] for n in chosen])]))
    return torch.stack(rows)


def flat_queries(model, names, q=3, seed=5):
    p = sum(x.numel() for n, x in model.named_parameters() if n in set(names))
    return torch.randn(q, p, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def model2():
    return tiny_model(layers=2, seed=3)


@pytest.fixture
def many():
    return random_sentences(11, 13, max_len=9, seed=4)


@pytest.mark.parametrize("method", ["forward", "grads"])
@pytest.mark.parametrize("names", [None, SUBSET])
@pytest.mark.parametrize("order", ["length", "index"])
def test_scores_equal_autograd_loop(tmp_path, model2, many, method, names, order):
    chosen = parameter_names(model2) if names is None else names
    q = flat_queries(model2, chosen)
    expected = -(loop_grads(model2, many, chosen) @ q.T).numpy()
    got = score_all(model2, many, EOS, q, tmp_path / "s", chunk_size=3, names=names, method=method, dtype="float64",
                    order=order, query_block=2)
    assert got.shape == (len(many), 3) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-11)
    assert np.abs(expected).max() > 1e-3  # a non-trivial oracle


def test_forward_and_grads_chunks_agree_with_dict_queries(model2, many):
    q = flat_queries(model2, SUBSET, q=4)
    qd = query_dict(model2, q, SUBSET)
    assert list(qd) == [n for n in parameter_names(model2) if n in SUBSET]
    assert query_dict(model2, list(q), SUBSET)["decoder.bias"].equal(qd["decoder.bias"])
    expected = loop_grads(model2, many[:5], SUBSET) @ q.T
    for method, block in (("forward", 3), ("forward", 8), ("grads", 8)):
        got = chunk_scores(model2, many[:5], EOS, qd, method, query_block=block)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_float32_file_rounds_the_float64_scores(tmp_path, model, sentences):
    q = flat_queries(model, parameter_names(model), q=2)
    expected = -(loop_grads(model, sentences, parameter_names(model)) @ q.T).numpy()
    got = score_all(model, sentences, EOS, q[0], tmp_path / "s", chunk_size=4, show_progress=False)
    assert got.dtype == np.float32 and got.shape == (len(sentences), 1)
    np.testing.assert_allclose(got[:, 0], expected[:, 0], rtol=1e-6, atol=1e-7)


def test_fused_lstm_has_forward_ad_on_cpu(model2, many):
    """The fused nn.LSTM (oneDNN off) and the unrolled LSTM give the same directional derivatives."""
    inputs, targets, mask = make_batch(many, EOS)
    params = {n: p.detach() for n, p in model2.named_parameters()}
    tangent = {n: torch.randn_like(p) for n, p in params.items()}
    out = {}
    for unrolled in (False, True):

        def losses(p, unrolled=unrolled):
            return sentence_loss(functional_call(model2, p, (inputs,), {"unrolled": unrolled}), targets, mask)

        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TF32 acceleration")  # printed whenever the flags are set
            warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")  # torch's first jvp
            with torch.backends.mkldnn.flags(enabled=False):
                out[unrolled] = jvp(losses, (params,), (tangent,))[1]
    torch.testing.assert_close(out[False], out[True], rtol=1e-10, atol=1e-12)


class Killed(RuntimeError):
    pass


@pytest.mark.parametrize("method", ["grads", "forward"])
def test_killed_run_resumes_bit_identical(tmp_path, model2, many, method, one_thread):
    q = flat_queries(model2, parameter_names(model2)).float().double()
    kw = {"chunk_size": 2, "method": method, "show_progress": False}
    whole = tmp_path / "whole"
    score_all(model2, many, EOS, q, whole, **kw)
    cut, k = tmp_path / "cut", 2

    def kill(chunk, finished):
        if finished == k:
            raise Killed

    with pytest.raises(Killed):
        score_all(model2, many, EOS, q, cut, on_chunk=kill, **kw)
    assert len(json.loads((cut / scoring.PROGRESS_FILE).read_text())["done"]) == k
    partial, _ = load_scores(cut, allow_partial=True)
    assert np.isnan(partial).all(axis=1).sum() == len(many) - 2 * k  # unfinished rows are NaN
    with pytest.raises(ValueError, match="call score_all with the same arguments"):
        load_scores(cut)
    calls = []
    score_all(model2, many, EOS, q, cut, on_chunk=lambda c, f: calls.append(c), **kw)
    assert len(calls) == -(-len(many) // 2) - k  # only the unfinished chunks were computed
    assert (cut / scoring.SCORES_FILE).read_bytes() == (whole / scoring.SCORES_FILE).read_bytes()
    a, config = load_scores(cut)
    assert np.array_equal(a, np.load(whole / scoring.SCORES_FILE)) and not np.isnan(a).any()
    assert config["finished_chunks"] == config["n_chunks"] and config["method"] == method


KILLED = """
import os, signal, sys
sys.path.insert(0, {root!r})
import torch
from tests.conftest import random_sentences, tiny_model
from ifutils.scoring import score_all
model = tiny_model(layers=2, seed=3)
sentences = random_sentences(11, 13, max_len=9, seed=4)
q = torch.randn(3, sum(p.numel() for p in model.parameters()), dtype=torch.float64,
                generator=torch.Generator().manual_seed(5))
def die(chunk, finished):
    if finished == 3:
        os.kill(os.getpid(), signal.SIGKILL)
score_all(model, sentences, 0, q, {out!r}, chunk_size=2, on_chunk=die)
"""


def test_sigkilled_run_resumes_bit_identical(tmp_path, model2, many, one_thread):
    """A real SIGKILL of another process after 3 chunks; the resumed file equals an uninterrupted run's."""
    root = str(Path(__file__).resolve().parent.parent)
    script = textwrap.dedent(KILLED.format(root=root, out=str(tmp_path / "cut")))
    proc = subprocess.run([sys.executable, "-c", script], check=False, cwd=tmp_path, capture_output=True, text=True,
                          env=one_thread_env())
    assert proc.returncode == -9, proc.stderr
    assert len(json.loads((tmp_path / "cut" / scoring.PROGRESS_FILE).read_text())["done"]) == 3
    q = flat_queries(model2, parameter_names(model2))
    resumed = score_all(model2, many, EOS, q, tmp_path / "cut", chunk_size=2, show_progress=False)
    whole = score_all(model2, many, EOS, q, tmp_path / "whole", chunk_size=2, show_progress=False)
    assert np.array_equal(resumed, whole) and not np.isnan(whole).any()
    cut, fresh = (tmp_path / d / scoring.SCORES_FILE for d in ("cut", "whole"))
    assert cut.read_bytes() == fresh.read_bytes()


def test_other_configuration_refused_and_files_kept(tmp_path, model, sentences):
    names = parameter_names(model)
    out = tmp_path / "s"
    score_all(model, sentences, EOS, flat_queries(model, names), out, chunk_size=4, show_progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []
    score_all(model, sentences, EOS, flat_queries(model, names), out, chunk_size=4, show_progress=False,
              on_chunk=lambda c, f: calls.append(c))
    assert calls == []  # a finished run with the same configuration is returned, not recomputed
    for change, field in (({"queries": flat_queries(model, names, seed=6)}, "queries_sha256"),
                          ({"chunk_size": 3}, "chunk_size"), ({"method": "forward"}, "method"),
                          ({"sentences": sentences[:-1]}, "sentences_sha256"), ({"dtype": "float64"}, "dtype")):
        args = {"queries": flat_queries(model, names), "chunk_size": 4, "sentences": sentences} | change
        with pytest.raises(ValueError, match=f"another configuration.*{field}"):
            score_all(model, args["sentences"], EOS, args["queries"], out, chunk_size=args["chunk_size"],
                      method=change.get("method", "grads"), dtype=change.get("dtype", "float32"), show_progress=False)
    other = tiny_model(seed=1)
    with pytest.raises(ValueError, match="model_sha256"):
        score_all(other, sentences, EOS, flat_queries(model, names), out, chunk_size=4, show_progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_foreign_directory_refused(tmp_path, model, sentences):
    out = tmp_path / "s"
    out.mkdir()
    np.save(out / scoring.SCORES_FILE, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="not written by score_all"):
        score_all(model, sentences, EOS, flat_queries(model, parameter_names(model)), out, show_progress=False)
    with pytest.raises(FileNotFoundError, match="run score_all"):
        load_scores(tmp_path / "none")


def test_memory_is_one_chunk(tmp_path, model, monkeypatch):
    """Every computation sees at most chunk_size sentences, each sentence exactly once; the file is (n, Q)."""
    seen = []
    original = scoring.chunk_scores

    def spy(model, chunk, *args, **kwargs):
        seen.append([id(s) for s in chunk])
        return original(model, chunk, *args, **kwargs)

    monkeypatch.setattr(scoring, "chunk_scores", spy)
    sents = random_sentences(23, 13, seed=8)
    got = score_all(model, sents, EOS, flat_queries(model, parameter_names(model), q=2), tmp_path / "s",
                    chunk_size=5, show_progress=False)
    assert max(len(c) for c in seen) == 5
    assert sorted(i for c in seen for i in c) == sorted(id(s) for s in sents)  # each sentence exactly once
    assert got.shape == (23, 2)
    order = np.load(tmp_path / "s" / scoring.ORDER_FILE)
    assert order.tolist() == sorted(range(23), key=lambda i: len(sents[i]))  # stable sort by length
    config = json.loads((tmp_path / "s" / scoring.CONFIG_FILE).read_text())
    assert config["n"] == 23 and config["q"] == 2 and config["n_chunks"] == 5 and config["dtype"] == "float32"


def test_bad_arguments(tmp_path, model, sentences):
    names = parameter_names(model)
    q = flat_queries(model, names)
    out = tmp_path / "s"
    cases = [
        ({"method": "reverse"}, ValueError, "method"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"query_block": 0}, ValueError, "query_block"),
        ({"dtype": "float16"}, ValueError, "dtype"),
        ({"order": "random"}, ValueError, "order"),
        ({"queries": q[:, :-1]}, ValueError, "P = "),
        ({"queries": q * float("nan")}, ValueError, "NaN"),
        ({"queries": "q"}, TypeError, "queries must be"),
        ({"queries": q, "names": ["nope"]}, ValueError, "unknown"),
        ({"queries": q, "names": "decoder.bias"}, TypeError, "not a string"),
        ({"queries": {"decoder.bias": torch.zeros(2, 3)}}, ValueError, r"queries\['decoder.bias'\]"),
        ({"queries": query_dict(model, q), "names": ["decoder.bias"]}, ValueError, "differ from the queries' keys"),
        ({"queries": torch.zeros(0, q.shape[1])}, ValueError, "Q = 0"),
        ({"sentences": []}, ValueError, "non-empty list"),
        ({"sentences": [torch.tensor([1.0, 0.0])]}, ValueError, "int64"),
        ({"sentences": [torch.tensor([99, 0])]}, ValueError, "outside"),
        ({"eos_id": "0"}, TypeError, "eos_id"),
    ]
    for change, error, message in cases:
        base = {"sentences": sentences, "eos_id": EOS, "queries": q, "names": None}
        args = base | change
        with pytest.raises(error, match=message):
            score_all(model, args["sentences"], args["eos_id"], args["queries"], out, names=args["names"],
                      **{k: v for k, v in change.items() if k not in base}, show_progress=False)
    model.train()
    with pytest.raises(ValueError, match="eval"):
        score_all(model, sentences, EOS, q, out, show_progress=False)
    assert not out.exists()  # nothing written by a refused call
