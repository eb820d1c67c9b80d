"""Counterfactual removals: the removal sets, the units, the table (against a brute-force loop), the sets file."""

import json

import numpy as np
import pytest

from ifutils.experiments.counterfactual import (
    CounterfactualConfig,
    format_removals,
    load_or_write_sets,
    removal_sets,
    removal_table,
    removal_units,
)


def _design():
    return CounterfactualConfig(n_queries=3, ks=(2, 5), methods=("ekfac", "identity"), seeds=(0, 1))


def test_sets_are_the_most_helpful_sentences_and_seeded_random_ones():
    config, n = _design(), 30
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(n, 6))
    sets = removal_sets(scores, config, n)
    for a, m in enumerate(config.methods):
        for j in range(3):
            col = scores[:, a * 3 + j]
            assert sets["top"][m][j] == sorted(range(n), key=lambda i: col[i])[:5]  # most negative influence first
    assert [len(sets["random"][k]) for k in (2, 5)] == [2, 5] and set(sets["random"][2]) <= set(range(n))
    assert removal_sets(scores, config, n)["random"] == sets["random"]  # seeded
    assert removal_sets(scores, CounterfactualConfig(**{**config.__dict__, "random_seed": 1}), n)["random"] != sets["random"]
    with pytest.raises(ValueError, match="scores must be"):
        removal_sets(scores[:, :5], config, n)


def test_units_remove_exactly_the_chosen_sentences():
    config, n = _design(), 30
    sets = removal_sets(np.random.default_rng(1).normal(size=(n, 6)), config, n)
    units = {u.name: u for u in removal_units(sets, config, n)}
    assert len(units) == 2 + 2 * 2 + 2 * 3 * 2 * 2
    assert list(units)[:2] == ["base_s0", "base_s1"] and units["base_s1"].indices == tuple(range(n))
    u = units["identity_q02_k2_s1"]
    assert u.seed == 1 and set(range(n)) - set(u.indices) == set(sets["top"]["identity"][2][:2])
    assert set(range(n)) - set(units["random_k5_s0"].indices) == set(sets["random"][5])
    names = list(units)
    assert names.index("ekfac_q00_k5_s0") < names.index("ekfac_q00_k2_s0")  # the largest k first


def test_table_equals_a_loop_over_queries_and_seeds():
    config = _design()
    queries = [4, 1, 7, 9]  # the first n_queries = 3 are used
    rng = np.random.default_rng(2)
    n_valid = 10
    records = {}
    for name in ["base_s0", "base_s1"] + [f"random_k{k}_s{s}" for k in (2, 5) for s in (0, 1)] + [
            f"{m}_q{j:02d}_k{k}_s{s}" for m in ("ekfac", "identity") for j in range(3) for k in (2, 5) for s in (0, 1)]:
        records[name] = {"valid_losses": rng.normal(5, 0.1, size=n_valid).tolist()}
    del records["identity_q01_k5_s1"]  # an unfinished model: that query is left out of its row
    table = removal_table(records, config, queries)
    rows = {(r["method"], r["k"]): r for r in table["rows"]}
    for (m, k), r in rows.items():
        expected, spreads = [], []
        for j, q in enumerate(queries[:3]):
            names = [f"random_k{k}_s{s}" if m == "random" else f"{m}_q{j:02d}_k{k}_s{s}" for s in (0, 1)]
            if not all(nm in records for nm in names):
                continue
            d = [records[nm]["valid_losses"][q] - records[f"base_s{s}"]["valid_losses"][q] for nm, s in zip(names, (0, 1))]
            expected.append(np.mean(d))
            spreads.append(max(d) - min(d))
        assert r["mean_delta"] == pytest.approx(np.mean(expected)) and r["queries"] == len(expected)
        assert r["mean_seed_spread"] == pytest.approx(np.mean(spreads))
    assert rows[("identity", 5)]["queries"] == 2 and rows[("identity", 5)]["per_query"][1] is None
    rand = rows[("random", 2)]["per_query"]
    wins = np.mean([a > b for a, b in zip(rows[("ekfac", 2)]["per_query"], rand)])
    assert rows[("ekfac", 2)]["beats_random"] == pytest.approx(wins)
    assert "| ekfac | 2 | 3 |" in format_removals(table)
    assert removal_table({}, config, queries) == {"rows": [], "base": None}


def test_the_sets_file_is_written_once_and_guards_its_design(tmp_path):
    config = _design()
    calls = []

    def compute():
        calls.append(1)
        return removal_sets(np.random.default_rng(3).normal(size=(30, 6)), config, 30)

    first = load_or_write_sets(tmp_path, compute, config)
    second = load_or_write_sets(tmp_path, compute, config)
    assert calls == [1] and second == first  # read back, the int keys restored
    assert json.loads((tmp_path / "removals.json").read_text())["config"]["ks"] == [2, 5]
    with pytest.raises(ValueError, match="another design"):
        load_or_write_sets(tmp_path, compute, CounterfactualConfig(n_queries=2, ks=(2, 5), seeds=(0, 1)))
    # kept in the repository's archive: a fresh clone (no checkpoints folder) reads the same sets back
    archive = tmp_path / "archive"
    assert load_or_write_sets(tmp_path, compute, config, archive) == first and calls == [1]
    assert (archive / "removals.json").read_bytes() == (tmp_path / "removals.json").read_bytes()
    assert load_or_write_sets(tmp_path / "fresh_clone", compute, config, archive) == first and calls == [1]
    assert load_or_write_sets(tmp_path / "other", compute, config, tmp_path / "archive2") == first and calls == [1, 1]
    assert (tmp_path / "archive2" / "removals.json").is_file()
    # a local file of other sets than the archived ones is refused (never silently replaced either way)
    (tmp_path / "third").mkdir()
    other = removal_sets(np.random.default_rng(4).normal(size=(30, 6)), config, 30)
    (tmp_path / "third" / "removals.json").write_text(json.dumps({"config": json.loads(json.dumps(
        __import__("dataclasses").asdict(config))), "sets": other}))
    with pytest.raises(ValueError, match="other removal sets"):
        load_or_write_sets(tmp_path / "third", compute, config, archive)
