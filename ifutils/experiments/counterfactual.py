"""Counterfactual removals (issue 15, item 4): retrain without the sentences a method says help a query most.

For each of the first ``n_queries`` LDS queries (validation sentences) and each method, the k training sentences
of most negative influence I_iq = -g_i^T q (the most helpful: up-weighting them lowers the query loss) are removed
from the ``n_train`` sentences of the LDS study, and the model is retrained from scratch with every seed of
``seeds`` (:mod:`ifutils.retrain`, the same :class:`~ifutils.retrain.RetrainSpec`). The measurement is the change of
the query's loss (nats/token) against the model trained on all n_train sentences with the same seed,

    Delta_q(method, k, s) = loss_q(theta_s(D \\ R_k)) - loss_q(theta_s(D)),

positive when the removal hurt the query as predicted (Ilyas et al. 2022, sec. 4; Park et al. 2023, fig. 6;
kronfluence's removal examples). The baseline removes k sentences drawn at random (one draw per k, shared by the
queries, since a random set does not depend on the query). Reported per (method, k): the mean over queries of the
seed-mean Delta with a bootstrap 95 % interval over queries, the mean seed spread (max - min over seeds), and the
fraction of queries whose Delta exceeds the random removal's.

The removal sets are computed once from the full-data model's scores and written to ``removals.json`` (atomically);
every later call reads that file, so a change of code or cache can never change the sets under models that are
already trained. Every model is its own resumable unit, listed base models first, then the random removals, then
k-major (largest k first) so that a stopped study has complete rows for the largest k.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import param, validate_fields
from ..io import atomic_write
from ..metrics import bootstrap_ci
from ..retrain import Unit

REMOVALS_FILE = "removals.json"
METHODS = ("ekfac", "identity")


@dataclass
class CounterfactualConfig:
    """The removal study's design (saved in ``removals.json`` and the results)."""

    n_queries: int = param(20, "queries (the first LDS queries) whose most helpful sentences are removed")
    ks: tuple[int, ...] = param((10, 50, 200), "numbers of sentences removed")
    methods: tuple[str, ...] = param(METHODS, "methods whose top-k helpful sentences are removed: ekfac (default "
                                              "damping) and/or identity (gradient dot product)")
    seeds: tuple[int, ...] = param((0, 1), "training seeds of every removal (and of the base model)")
    random_seed: int = param(0, "seeds the random removals")

    def __post_init__(self):
        validate_fields(self)
        if unknown := [m for m in self.methods if m not in METHODS]:
            raise ValueError(f"unknown removal methods {unknown}; choose from {', '.join(METHODS)}")
        if self.n_queries < 1 or not self.ks or any(k < 1 for k in self.ks) or not self.seeds:
            raise ValueError("need n_queries >= 1, one or more ks >= 1 and one or more seeds")
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.ks)) != len(self.ks):
            raise ValueError(f"seeds and ks must be distinct, got {self.seeds}, {self.ks}")


def removal_sets(scores: np.ndarray, config: CounterfactualConfig, n_train: int) -> dict:
    """The sentences removed: {"top": {method: {query column j: [indices of the max(ks) most helpful]}}, "random":
    {k: [indices]}}; ``scores`` (n_train, len(methods) x n_queries), method-major columns, influence I (negative =
    helpful). Ties are broken by index (stable sort)."""
    if scores.shape != (n_train, len(config.methods) * config.n_queries):
        raise ValueError(f"scores must be ({n_train}, {len(config.methods) * config.n_queries}), got {scores.shape}")
    kmax = max(config.ks)
    if kmax >= n_train:
        raise ValueError(f"k={kmax} would remove every sentence of n_train={n_train}")
    top = {m: {j: np.argsort(scores[:, a * config.n_queries + j], kind="stable")[:kmax].tolist()
               for j in range(config.n_queries)} for a, m in enumerate(config.methods)}
    rng = np.random.default_rng(config.random_seed)
    order = rng.permutation(n_train)
    return {"top": top, "random": {k: sorted(order[:k].tolist()) for k in config.ks}}


def removal_units(sets: dict, config: CounterfactualConfig, n_train: int) -> list[Unit]:
    """Units: ``base_s<seed>`` (all sentences), ``random_k<k>_s<seed>``, then ``<method>_q<jj>_k<k>_s<seed>`` for
    k from the largest down, query, method, seed."""
    everything = set(range(n_train))
    keep = lambda removed: tuple(sorted(everything - set(removed)))  # noqa: E731
    units = [Unit(f"base_s{s}", tuple(range(n_train)), s) for s in config.seeds]
    units += [Unit(f"random_k{k}_s{s}", keep(sets["random"][k]), s) for k in sorted(config.ks, reverse=True)
              for s in config.seeds]
    for k in sorted(config.ks, reverse=True):
        for j in range(config.n_queries):
            for m in config.methods:
                removed = sets["top"][m][j][:k]
                units += [Unit(f"{m}_q{j:02d}_k{k}_s{s}", keep(removed), s) for s in config.seeds]
    return units


def load_or_write_sets(root: Path, compute, config: CounterfactualConfig, archive: Path | None = None) -> dict:
    """The removal sets of ``root/removals.json``; computed by ``compute()`` and written when the file is absent.

    ``archive``: a folder in the repository that keeps a copy of the file (:mod:`ifutils.retrain`); when ``root``
    lacks the file and the archive has it, it is copied back instead of computed (the sets of a fresh clone are the
    ones the archived removal models were trained on).

    Raises:
        ValueError: the file was written for another design (pick another root).
    """
    path = Path(root) / REMOVALS_FILE
    kept = Path(archive) / REMOVALS_FILE if archive is not None else None
    if not path.is_file() and kept is not None and kept.is_file():
        atomic_write(path, lambda tmp: tmp.write_bytes(kept.read_bytes()))
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored["config"] != json.loads(json.dumps(asdict(config))):
            raise ValueError(f"{path} was written for another design {stored['config']}; pick another --root")
        if kept is not None and not kept.is_file():  # checked first: another design's file never enters the archive
            atomic_write(kept, lambda tmp: tmp.write_bytes(path.read_bytes()))
        elif kept is not None and json.loads(kept.read_text()) != stored:
            raise ValueError(f"{path} and the archived {kept} hold other removal sets; keep the archived ones (delete "
                             f"{path}) or pick another --root and --archive")
        sets = stored["sets"]
        sets["top"] = {m: {int(j): v for j, v in per.items()} for m, per in sets["top"].items()}
        sets["random"] = {int(k): v for k, v in sets["random"].items()}
        return sets
    sets = compute()
    text = json.dumps({"config": asdict(config), "sets": sets})
    for target in (path, kept) if kept is not None else (path,):
        atomic_write(target, lambda tmp: tmp.write_text(text))
    return sets


def removal_table(records: dict, config: CounterfactualConfig, queries: list[int], seed: int = 0) -> dict:
    """Delta of each finished removal (module docstring), aggregated per (method, k) and for the random removals.

    Args:
        records: {unit name: record} (:func:`ifutils.retrain.load_records`). queries: the validation indices of
            the query columns (the first ``config.n_queries`` LDS queries).
    Returns:
        {"rows": [{"method", "k", "queries" (with every seed finished), "mean_delta", "ci", "mean_seed_spread",
        "beats_random" (fraction of queries with Delta above the random removal's), "per_query"}], "base": per-seed
        base losses of the queries}; rows without any finished query are left out.
    """
    qs = queries[: config.n_queries]
    base = {s: records.get(f"base_s{s}") for s in config.seeds}
    if any(b is None for b in base.values()):
        return {"rows": [], "base": None}
    base_loss = {s: np.asarray(base[s]["valid_losses"])[qs] for s in config.seeds}

    def deltas(name_of):
        """(Q,) seed-mean Delta and (Q,) seed spread; NaN for a query missing a seed."""
        mean, spread = np.full(len(qs), np.nan), np.full(len(qs), np.nan)
        for j in range(len(qs)):
            values = []
            for s in config.seeds:
                r = records.get(name_of(j, s))
                if r is None:
                    break
                values.append(np.asarray(r["valid_losses"])[qs[j]] - base_loss[s][j])
            else:
                mean[j], spread[j] = np.mean(values), np.ptp(values)
        return mean, spread

    rows, random_delta = [], {}
    for k in config.ks:
        mean, spread = deltas(lambda j, s, k=k: f"random_k{k}_s{s}")
        random_delta[k] = mean
        if np.isfinite(mean).any():
            rows.append(_row("random", k, mean, spread, None, seed))
    for m in config.methods:
        for k in config.ks:
            mean, spread = deltas(lambda j, s, m=m, k=k: f"{m}_q{j:02d}_k{k}_s{s}")
            if np.isfinite(mean).any():
                rows.append(_row(m, k, mean, spread, random_delta.get(k), seed))
    return {"rows": rows, "base": {str(s): v.tolist() for s, v in base_loss.items()}}


def _row(method, k, mean, spread, random, seed) -> dict:
    ok = np.isfinite(mean)
    values = mean[ok]
    ci = (bootstrap_ci(lambda idx: float(values[idx].mean()), len(values), seed) if len(values) > 1
          else (float("nan"), float("nan")))
    beats = None
    if random is not None and np.isfinite(random).any():
        both = ok & np.isfinite(random)
        beats = float((mean[both] > random[both]).mean()) if both.any() else None
    return {"method": method, "k": k, "queries": int(ok.sum()), "mean_delta": float(values.mean()), "ci": list(ci),
            "mean_seed_spread": float(spread[ok].mean()), "beats_random": beats,
            "per_query": [None if not np.isfinite(v) else float(v) for v in mean]}


def removal_scores(ctx, config: CounterfactualConfig, out_dir: Path) -> np.ndarray:
    """(n_train, len(methods) x n_queries) influence of every training sentence on the removal queries under each
    method (EK-FAC at the study's default damping; the gradient dot product), by one resumable scoring pass
    (:func:`ifutils.scoring.score_all`). ``ctx`` is the LDS :class:`~ifutils.experiments.lds_methods.Context`."""
    from ..scoring import score_all

    g = ctx.query_grads[1 : 1 + config.n_queries]
    blocks = []
    for m in config.methods:
        if m == "identity":
            blocks.append(g.float())
        else:
            c = ctx.kfac_curvatures("model")["ekfac"]
            blocks.append(c.solve(g.T.double(), ctx.default_damping).T.float())
    return np.asarray(score_all(ctx.model, ctx.train, ctx.eos, torch.cat(blocks), out_dir,
                                chunk_size=ctx.wconfig.chunk_size))


def format_removals(table: dict) -> str:
    """Markdown: mean Delta loss (nats/token) per method and k, with its interval, seed spread and win rate."""
    lines = ["| removed by | k | queries | mean change of the query loss [95% CI] | mean seed spread | "
             "queries above random |", "|---|---|---|---|---|---|"]
    for r in sorted(table["rows"], key=lambda r: (r["k"], r["method"] != "random", r["method"])):
        beats = "-" if r["beats_random"] is None else f"{r['beats_random']:.2f}"
        lines.append(f"| {r['method']} | {r['k']} | {r['queries']} | {r['mean_delta']:+.4f} [{r['ci'][0]:+.4f}, "
                     f"{r['ci'][1]:+.4f}] | {r['mean_seed_spread']:.4f} | {beats} |")
    return "\n".join(lines)
