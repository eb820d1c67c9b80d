"""Sharding over processes (ifutils.distributed): ``torchrun --nproc_per_node=2`` on CPU (gloo) gives the factors,
EK-FAC blocks, diagonal Fishers and scores of one process (the oracle: the same functions with distributed=False
in this process), a scoring run interrupted under two ranks is finished by one process, rank 0's cached final sums
are read by a single process, per-rank partial sums resume and add up to the whole, and the shard helper takes
every index exactly once (brute-force count)."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ifutils import distributed as dist_utils
from ifutils.curvature import network_kfac as nk
from ifutils.model import LSTMLM, ModelConfig
from ifutils.scoring import load_scores, score_all

from .conftest import EOS, random_sentences, tiny_model

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "experiments" / "distributed_check.py"
SETTINGS = ["--vocab", "13", "--emb", "5", "--hidden", "6", "--layers", "2", "--n-sentences", "20", "--max-len",
            "6", "--queries", "3", "--chunk-size", "3", "--mc-samples", "2", "--seed", "3", "--device", "cpu"]
INTERRUPT = 3  # scoring chunks recorded before the interrupted run stops (a round of two ranks records 4)
RTOL = 1e-9  # float64 sums in another order: the differences are ~1e-15 relative


def _close(got, expected, what):
    got, expected = torch.as_tensor(got).double(), torch.as_tensor(expected).double()
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=RTOL * scale, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One ``torchrun --standalone --nproc_per_node=2`` of experiments/distributed_check.py on CPU."""
    out = tmp_path_factory.mktemp("dist")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), IFUTILS_PROGRESS="lines", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(CHECK),
           "--out", str(out / "run"), "--cache-dir", str(out / "cache"), "--interrupt-after", str(INTERRUPT),
           *SETTINGS]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    problem = torch.load(out / "run" / "problem.pt", weights_only=True)
    model = LSTMLM(ModelConfig(**problem["model_config"])).double()
    model.load_state_dict(problem["state_dict"])
    return {"out": out, "dir": out / "run", "problem": problem, "model": model.eval()}


def _fit_kwargs(problem):
    s = problem["settings"]
    return {"mc_samples": s["mc_samples"], "chunk_size": s["chunk_size"], "seed": s["seed"], "distributed": False}


def test_two_ranks_ran_under_gloo(run):
    summary = json.loads((run["dir"] / "summary.json").read_text())
    assert summary["world"] == 2 and summary["backend"] == "gloo" and summary["device"] == "cpu"


@pytest.mark.parametrize("labels", ["model", "data"])
def test_factors_and_diagonals_equal_one_process(run, labels):
    model, train = run["model"], run["problem"]["train"]
    single = nk.fit_network_kfac(model, train, EOS, labels=labels, **_fit_kwargs(run["problem"]))
    got = torch.load(run["dir"] / f"factors_{labels}.pt", weights_only=True)
    assert (got["n"], got["tokens"]) == (single.n, single.tokens)
    assert sorted(got["factors"]) == sorted(single.factors)
    for key, value in single.factors.items():
        _close(got["factors"][key], value, key)
    sharded = nk.NetworkFactors(single.names, single.shapes, got["factors"], labels, single.mc_samples, got["n"],
                                got["tokens"], got["eigenvalues"])
    for build in (nk.kfac_network_curvature, nk.ekfac_network_curvature):  # dense blocks: free of basis choices
        a, b = build(sharded), build(single)
        for name in single.names:
            _close(a.dense_block(name), b.dense_block(name), f"{a.name} {name}")
    diag = nk.diagonal_fisher(model, train, EOS, labels=labels, **_fit_kwargs(run["problem"]))
    _close(torch.load(run["dir"] / f"diagonal_{labels}.pt", weights_only=True), diag.d, "diagonal")
    assert float(diag.d.abs().max()) > 1e-6  # a non-trivial oracle


def test_scores_equal_one_process_and_an_interrupted_run_resumes(run, tmp_path):
    model, problem = run["model"], run["problem"]
    kwargs = {"chunk_size": problem["settings"]["chunk_size"], "method": problem["settings"]["method"],
              "dtype": "float64", "distributed": False}
    expected = score_all(model, problem["train"], EOS, problem["queries"], tmp_path / "single", **kwargs)
    got, config = load_scores(run["dir"] / "scores")
    assert config["finished_chunks"] == config["n_chunks"] == 7
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())
    assert np.abs(expected).max() > 1e-6

    partial, config = load_scores(run["dir"] / "scores_interrupted", allow_partial=True)
    assert config["finished_chunks"] == INTERRUPT + 1  # rounds of two chunks
    assert np.isnan(partial).any() and not np.isnan(partial).all()
    kept = np.array(partial)
    resumed = score_all(model, problem["train"], EOS, problem["queries"], run["dir"] / "scores_interrupted",
                        **kwargs)
    finished = ~np.isnan(kept)
    np.testing.assert_array_equal(np.asarray(resumed)[finished], kept[finished])  # rows kept, not recomputed
    np.testing.assert_allclose(resumed, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


def test_rank_zero_cached_the_final_sums_for_a_single_process(run, monkeypatch):
    monkeypatch.setattr(nk, "_factor_chunk", lambda *a, **k: pytest.fail("the factor pass was not cached"))
    monkeypatch.setattr(nk, "_ekfac_chunk", lambda *a, **k: pytest.fail("the EK-FAC pass was not cached"))
    kwargs = {**_fit_kwargs(run["problem"]), "cache_dir": run["out"] / "cache"}
    cached = nk.fit_network_kfac(run["model"], run["problem"]["train"], EOS, labels="model", **kwargs)
    got = torch.load(run["dir"] / "factors_model.pt", weights_only=True)
    for key, value in got["factors"].items():
        assert torch.equal(cached.factors[key], value), key
    for name, value in got["eigenvalues"].items():
        assert torch.equal(cached.eigenvalues[name], value), name


def test_per_rank_partial_sums_resume_and_add_up(tmp_path, monkeypatch):
    """Each simulated rank of two (``_world`` patched; without a group the all-reduce is the identity) sums its
    strided chunks; a kill of rank 1 resumes from its own partial sums; the two ranks' sums are the whole."""
    model, sentences = tiny_model(layers=2), random_sentences(11, 13, max_len=5, seed=2)
    kwargs = {"labels": "data", "chunk_size": 2, "save_every": 0.0, "distributed": False}
    whole = nk.diagonal_fisher(model, sentences, EOS, **kwargs).d
    parts = []
    for r in (0, 1):
        monkeypatch.setattr(nk, "_world", lambda distributed, r=r: (r, 2))
        parts.append(nk.diagonal_fisher(model, sentences, EOS, **kwargs).d)
    real, calls, counted = nk._diag_chunk, [], []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(nk, "_diag_chunk", dying)  # still rank 1 of 2
    with pytest.raises(KeyboardInterrupt):
        nk.diagonal_fisher(model, sentences, EOS, cache_dir=tmp_path, **kwargs)
    assert len(list(tmp_path.glob("*/diagonal.partial.rank1of2.pt"))) == 1
    monkeypatch.setattr(nk, "_diag_chunk", lambda *a, **k: (counted.append(1), real(*a, **k)))
    resumed = nk.diagonal_fisher(model, sentences, EOS, cache_dir=tmp_path, **kwargs).d
    assert len(counted) == 2  # rank 1 holds chunks 1, 3, 5 of 6; chunk 1 came from its partial sums
    assert torch.equal(resumed, parts[1])
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-12, atol=1e-15)
    assert not torch.equal(parts[0], whole) and float(parts[1].abs().max()) > 0


@pytest.mark.parametrize("mode", dist_utils.SHARD_MODES)
def test_shard_takes_every_index_exactly_once(mode):
    for n in range(14):
        items = [f"x{i}" for i in range(n)]
        for world in range(1, 6):
            parts = [dist_utils.shard(items, r, world, mode) for r in range(world)]
            assert Counter(x for p in parts for x in p) == Counter(items), (n, world)
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            for p in parts:  # each part keeps the input order
                assert p == sorted(p, key=items.index)
            if mode == "contiguous":
                assert [x for p in parts for x in p] == items
            else:
                assert parts[0] == items[::world]


def test_helpers_without_a_group_act_as_one_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    ctx = dist_utils.init("cpu")
    assert (ctx.rank, ctx.world, ctx.backend, ctx.device) == (0, 1, None, torch.device("cpu"))
    assert not dist_utils.active() and dist_utils.is_main() and dist_utils.world_size() == 1
    x = torch.arange(6.0).reshape(3, 2)
    assert dist_utils.all_reduce_sum({"a": x})["a"] is x and dist_utils.gather_rows(x)[0] is x
    assert dist_utils.broadcast_object({"k": 1}) == {"k": 1}
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="torchrun"):
        dist_utils.init("cpu")
    with pytest.raises(ValueError, match="distributed=True"):
        nk.diagonal_fisher(tiny_model(), random_sentences(3, 13), EOS, distributed=True)
    for bad in ((0, 0), (2, 2), (-1, 2)):
        with pytest.raises(ValueError):
            dist_utils.shard(range(4), *bad)
    with pytest.raises(ValueError, match="mode"):
        dist_utils.shard(range(4), 0, 2, "random")
