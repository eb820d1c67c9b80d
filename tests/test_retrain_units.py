"""The trainer of many small models (ifutils.retrain): subsets, resume after a kill, skipping finished units."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ifutils.retrain as retrain
from ifutils.io import load_checkpoint
from ifutils.model import sentence_loss
from ifutils.data import make_batch
from ifutils.retrain import RetrainSpec, Unit, random_subsets, run_units, select_train, sentence_losses, train_unit

from .conftest import one_thread_env
from .test_train import toy_corpus

SPEC = RetrainSpec(n_train=50, emb_dim=8, hidden=8, dropout=0.2, epochs=3, batch_size=8)
ROOT = str(Path(__file__).resolve().parent.parent)


def test_random_subsets_are_seeded_distinct_and_of_the_requested_size():
    a, b = random_subsets(50, 4, 0.5, seed=1), random_subsets(50, 4, 0.5, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], random_subsets(50, 4, 0.5, seed=2)[0])
    for s in a:
        assert len(s) == 25 and len(set(s.tolist())) == 25 and s.min() >= 0 and s.max() < 50
    for bad in ((50, 4, 0.0), (50, 4, 1.0), (0, 4, 0.5), (50, 0, 0.5), (1, 1, 0.2)):
        with pytest.raises(ValueError):
            random_subsets(*bad)


def test_select_train_keeps_exactly_the_indices_and_names_the_selection():
    corpus = toy_corpus()
    data = select_train(corpus, 50, [4, 0, 9])
    assert [id(s) for s in data.splits["train"]] == [id(corpus.splits["train"][i]) for i in (4, 0, 9)]
    assert data.splits["valid"] is corpus.splits["valid"]
    assert data.name != select_train(corpus, 50, [4, 0, 8]).name
    for bad in ([], [3, 3], [50], [-1]):
        with pytest.raises(ValueError, match="indices"):
            select_train(corpus, 50, bad)


def test_sentence_losses_equal_a_loop_over_sentences():
    from .conftest import tiny_model

    corpus, model = toy_corpus(), tiny_model(vocab=12, seed=3)
    losses, mean = sentence_losses(model, corpus.splits["valid"], 0, batch_size=5)
    total = tokens = 0.0
    for i, s in enumerate(corpus.splits["valid"]):  # brute force: one sentence at a time
        inputs, targets, mask = make_batch([s], 0)
        with torch.no_grad():
            value = float(sentence_loss(model(inputs), targets, mask)[0])
        assert losses[i] == pytest.approx(value, rel=1e-12)
        total, tokens = total + value * len(s), tokens + len(s)
    assert mean == pytest.approx(total / tokens, rel=1e-12)


def test_a_finished_unit_is_skipped_and_its_record_returned(tmp_path, monkeypatch):
    unit = Unit("m000_s0", tuple(range(0, 50, 2)), 0)
    first = train_unit(toy_corpus(), SPEC, unit, tmp_path)
    assert len(first["valid_losses"]) == 16 and len(first["history"]) == 3
    monkeypatch.setattr(retrain, "train_language_model", lambda *a, **k: pytest.fail("a finished unit was retrained"))
    assert train_unit(toy_corpus(), SPEC, unit, tmp_path) == first
    assert run_units(toy_corpus(), SPEC, [unit], tmp_path) == ["m000_s0"]
    with pytest.raises(ValueError, match="other indices"):
        train_unit(toy_corpus(), SPEC, Unit("m000_s0", tuple(range(1, 50, 2)), 0), tmp_path)


def test_an_archived_unit_is_restored_on_a_fresh_clone_without_training_and_archiving_is_byte_stable(tmp_path,
                                                                                                 monkeypatch):
    """A study spanning sessions: the checkpoints folder is gone (a fresh clone), the archive in the repository
    holds the record; run_units restores it and trains only the unit the archive lacks; load_records reads either."""
    from ifutils.retrain import archive_records, archived_record, load_records

    a, b = Unit("a", tuple(range(0, 50, 2)), 0), Unit("b", tuple(range(1, 50, 2)), 1)
    archive = tmp_path / "repo" / "results" / "retrained"
    first = train_unit(toy_corpus(), SPEC, a, tmp_path / "old_clone", archive=archive)
    blob = (archive / "a.json.gz").read_bytes()
    assert archived_record(archive, "a") == json.loads(json.dumps(first))
    assert archive_records(tmp_path / "old_clone", [a], archive) == [] and (archive / "a.json.gz").read_bytes() == blob
    trained = []
    real = retrain.train_language_model
    monkeypatch.setattr(retrain, "train_language_model", lambda data, *args, **kw: trained.append(
        len(data.splits["train"])) or real(data, *args, **kw))
    assert run_units(toy_corpus(), SPEC, [a, b], tmp_path / "new_clone", archive=archive) == ["a", "b"]
    assert trained == [25]  # only b was trained
    assert not (tmp_path / "new_clone" / "a" / "model.pt").exists()
    assert load_records(tmp_path / "new_clone", [a, b])["a"]["valid_losses"] == first["valid_losses"]
    assert set(load_records(tmp_path / "elsewhere", [a, b], archive)) == {"a", "b"}
    with pytest.raises(ValueError, match="pick another archive"):
        train_unit(toy_corpus(), SPEC, Unit("a", tuple(range(1, 50, 2)), 0), tmp_path / "third", archive=archive)
    # an archived record of another design stops neither the restores nor the trainings of the other units
    (archive / "b.json.gz").rename(archive / "z.json.gz")
    z = Unit("z", tuple(range(2, 50, 2)), 5)
    with pytest.raises(RuntimeError, match="1 units failed"):
        run_units(toy_corpus(), SPEC, [z, a, b], tmp_path / "fourth", archive=archive)
    assert (tmp_path / "fourth" / "b" / "record.json").is_file() and not (tmp_path / "fourth" / "z").exists()
    (archive / "z.json.gz").rename(archive / "b.json.gz")
    # a record trained before the study had an archive is copied into it by run_units
    c = Unit("c", tuple(range(0, 50, 5)), 2)
    train_unit(toy_corpus(), SPEC, c, tmp_path / "new_clone")
    assert archived_record(archive, "c") is None
    run_units(toy_corpus(), SPEC, [a, b, c], tmp_path / "new_clone", archive=archive)
    assert archived_record(archive, "c")["seed"] == 2 and trained == [25, 25, 10]  # b again in "fourth", c


def test_a_unit_killed_mid_training_resumes_to_the_weights_and_losses_of_an_uninterrupted_one(tmp_path, one_thread):
    """SIGKILL right after the first epoch's checkpoint (inside run_units); the rerun finishes the same unit, and
    its weights and validation losses equal an uninterrupted run's bit for bit."""
    script = f"""
import os, signal, sys
sys.path.insert(0, {ROOT!r})
import ifutils.train as train
from tests.test_train import toy_corpus
from tests.test_retrain_units import SPEC
from ifutils.retrain import Unit, run_units
real = train.save_checkpoint
def save_then_die(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
train.save_checkpoint = save_then_die
run_units(toy_corpus(), SPEC, [Unit("u", tuple(range(0, 50, 2)), 1)], {str(tmp_path / 'killed')!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=one_thread_env())
    assert proc.returncode == -9, proc.stderr
    assert not (tmp_path / "killed" / "u" / "record.json").exists()
    unit = Unit("u", tuple(range(0, 50, 2)), 1)
    resumed = train_unit(toy_corpus(), SPEC, unit, tmp_path / "killed")
    full = train_unit(toy_corpus(), SPEC, unit, tmp_path / "full")
    assert resumed["valid_losses"] == full["valid_losses"]
    a, _, _ = load_checkpoint(tmp_path / "killed" / "u" / "model.pt")
    b, _, _ = load_checkpoint(tmp_path / "full" / "u" / "model.pt")
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


def test_shards_split_the_units_and_together_cover_them(tmp_path):
    units = [Unit(f"u{j}", tuple(range(j, 50, 5)), j) for j in range(5)]
    spec = RetrainSpec(n_train=50, emb_dim=4, hidden=4, epochs=1, batch_size=16)
    even = run_units(toy_corpus(), spec, units, tmp_path, shard=(0, 2))
    odd = run_units(toy_corpus(), spec, units, tmp_path, shard=(1, 2))
    assert even == ["u0", "u2", "u4"] and odd == ["u1", "u3"]
    assert sorted(json.loads((tmp_path / f"u{j}" / "record.json").read_text())["seed"] for j in range(5)) == list(range(5))
    for bad in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="shard"):
            run_units(toy_corpus(), spec, units, tmp_path, shard=bad)


def test_a_unit_another_process_trains_is_skipped_and_taken_up_once_its_lock_is_released(tmp_path):
    """A separate process holds unit a's lock (as a running trainer does): train_unit returns None and writes
    nothing, run_units trains only b; once that process ends (the kernel drops its lock), a is trained."""
    a, b = Unit("a", tuple(range(0, 50, 2)), 0), Unit("b", tuple(range(1, 50, 2)), 0)
    (tmp_path / "a").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, sys, time
handle = open({str(tmp_path / 'a' / 'train.lock')!r}, 'a+')
fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
print('locked', flush=True)
time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train_unit(toy_corpus(), SPEC, a, tmp_path) is None
        assert not (tmp_path / "a" / "model.pt").exists() and not (tmp_path / "a" / "record.json").exists()
        assert run_units(toy_corpus(), SPEC, [a, b], tmp_path) == ["b"]
    finally:
        holder.kill()
        holder.wait()
    assert run_units(toy_corpus(), SPEC, [a, b], tmp_path) == ["a", "b"]
    assert train_unit(toy_corpus(), SPEC, a, tmp_path)["valid_losses"] == train_unit(
        toy_corpus(), SPEC, a, tmp_path / "again")["valid_losses"]


def test_wait_for_units_waits_for_the_units_being_trained_at_the_call_and_no_others(tmp_path):
    """A separate process trains unit a (holds its lock), then takes d's lock and finishes a (writes its record,
    releases the lock): the wait returns once a is released, although d is now locked; b (never started) and c
    (lock file left by a killed process) are not waited for. A wait on d alone times out."""
    from ifutils.retrain import wait_for_units

    units = [Unit(n, (0,), 0) for n in "abcd"]
    for n in "acd":
        (tmp_path / n).mkdir()
    (tmp_path / "c" / "train.lock").touch()
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, pathlib, time
root = pathlib.Path({str(tmp_path)!r})
a = open(root / 'a' / 'train.lock', 'a+')
fcntl.flock(a.fileno(), fcntl.LOCK_EX)
print('locked', flush=True)
time.sleep(1.0)
d = open(root / 'd' / 'train.lock', 'a+')
fcntl.flock(d.fileno(), fcntl.LOCK_EX)
(root / 'a' / 'record.json').write_text('{{}}')
a.close()
print('a done', flush=True)
time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert wait_for_units(tmp_path, units, poll_s=0.05, timeout_s=60) == ["a"]
        assert holder.stdout.readline().strip() == "a done" and (tmp_path / "a" / "record.json").is_file()
        with pytest.raises(TimeoutError, match="d"):
            wait_for_units(tmp_path, units, poll_s=0.05, timeout_s=0.2)
    finally:
        holder.kill()
        holder.wait()
    assert wait_for_units(tmp_path, units, poll_s=0.05) == []
    for bad in ({"poll_s": 0}, {"timeout_s": -1}):
        with pytest.raises(ValueError, match="poll_s"):
            wait_for_units(tmp_path, units, **bad)


def test_a_unit_that_raises_does_not_stop_the_others_and_is_reported_at_the_end(tmp_path):
    from ifutils.retrain import train_each

    ran = []

    def job(name, fail=False, busy=False):
        ran.append(name)
        if fail:
            raise FloatingPointError("loss is NaN")
        return None if busy else {"name": name}

    with pytest.raises(RuntimeError, match=r"1 units failed.*b: FloatingPointError"):
        train_each([("a", lambda: job("a")), ("b", lambda: job("b", fail=True)), ("c", lambda: job("c", busy=True)),
                    ("d", lambda: job("d"))], "test")
    assert ran == ["a", "b", "c", "d"]
    assert train_each([("a", lambda: job("a")), ("c", lambda: job("c", busy=True))], "test") == (["c"], ["a"])
    with pytest.raises(TypeError, match="callable"):
        train_each([("a", "not callable")], "test")
    # run_units: a unit whose checkpoint was written for another configuration fails; the next one is still trained
    bad, good = Unit("bad", tuple(range(0, 50, 2)), 0), Unit("good", tuple(range(1, 50, 2)), 0)
    (tmp_path / "bad").mkdir()
    torch.save({"not": "a checkpoint"}, tmp_path / "bad" / "model.pt")
    with pytest.raises(RuntimeError, match="1 units failed"):
        run_units(toy_corpus(), SPEC, [bad, good], tmp_path)
    assert (tmp_path / "good" / "record.json").is_file() and not (tmp_path / "bad" / "record.json").exists()
