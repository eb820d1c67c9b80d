"""What influence is for (issue 16, items 2-5): trimming, data selection, a continual-learning replay buffer and
unlearning, on the small retrainable configuration of the LDS study (:class:`~ifutils.retrain.RetrainSpec`).

Every ranking comes from :func:`ifutils.experiments.detection.rankings` on the model trained on all ``n_train``
clean sentences (the LDS study's full-data model): the influence of each training sentence on the validation loss,
I_i = -g_i^T (C + lambda_0 I)^{-1} g_val (positive = harmful: up-weighting it raises the validation loss), for
EK-FAC, the diagonal EF and the identity (gradient dot product), the gradient L2 norm of Outlier Gradient Analysis
(high = outlier = flagged harmful) and the training loss (high = flagged harmful). ``harm`` below is that score.

* **Trimming** (item 2): remove the top-k % by harm (k in ``trim_percents``), or a random k %, retrain from scratch
  with every seed; validation and test perplexity (the epoch count is the LDS study's, chosen by validation on the
  full-data model; the test split is never used for a choice).
* **Selection** (item 3): train only on the k % of least harm (k in ``select_percents``), or a random k %.
* **Replay buffer** (item 4): task 1 is PTB (the full-data model), task 2 the text8-format sample (words outside the
  PTB vocabulary become ``<unk>``, ``window``-word windows, its last tenth the task-2 validation set that steers the
  learning rate). The model continues on task 2 for ``task2_epochs`` epochs with a buffer of b task-1 sentences
  mixed in: the b most helpful (least harm) by a method, b at random, the b of highest training loss, or none.
  Reported: task-1 (PTB) validation and test perplexity after task 2.
* **Unlearning** (item 5): forget a set S (``forget_size`` random training sentences) by one Newton step
  theta <- theta + (1/n) (C + lambda I)^{-1} sum_{i in S} g_i (:func:`ifutils.influence.newton_removal`) per curvature
  and damping, against the model retrained without S (every seed): parameter distance to the retrained model of the
  original's seed, mean loss on S, validation loss, and the membership-inference gap (mean loss on S minus mean loss
  on test sentences never trained on; Shokri et al. 2017's loss-threshold attack reads this gap).

Every retrained model is a resumable unit under its own directory; ``units`` lists them, ``measure`` builds the
tables from the finished ones.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import param, validate_fields
from ..data import Corpus
from ..progress import log
from ..retrain import RetrainSpec, Unit

HARM_METHODS = ("valid:ekfac", "valid:ef_diag", "valid:identity", "grad_l2", "train_loss")
"""Rankings (keys of :func:`ifutils.experiments.detection.rankings`) whose harm scores the applications act on."""


@dataclass
class ApplicationsConfig:
    """The designs of items 2-5 (saved with the results)."""

    seeds: tuple[int, ...] = param((0, 1, 2), "training seeds of every retrained model")
    methods: tuple[str, ...] = param(HARM_METHODS, "rankings acted on (besides random)")
    trim_percents: tuple[float, ...] = param((1.0, 5.0, 10.0), "percent of the training set trimmed")
    select_percents: tuple[float, ...] = param((10.0, 30.0, 50.0), "percent of the training set selected")
    buffer_sizes: tuple[int, ...] = param((100, 500, 2000), "replay buffer sizes (task-1 sentences)")
    buffer_methods: tuple[str, ...] = param(("valid:ekfac", "valid:identity", "train_loss"),
                                            "rankings that fill the buffer (besides random and none)")
    task2_epochs: int = param(2, "epochs of the second task")
    window: int = param(35, "words per text8 window of the second task")
    task2_words: int = param(500_000, "words of the text8-format file read for the second task (its first ones)")
    forget_size: int = param(100, "random training sentences to forget")
    unlearn_dampings: tuple[float, ...] = param((1e-3, 1e-2, 1e-1), "absolute dampings of the Newton steps "
                                                                     "(besides the default lambda_0)")
    random_seed: int = param(0, "seeds the random choices (trimmed, selected, buffered, forgotten sentences)")

    def __post_init__(self):
        validate_fields(self)
        if not self.seeds or any(not 0 < k < 100 for k in (*self.trim_percents, *self.select_percents)):
            raise ValueError("need seeds, and percents in (0, 100)")
        if self.task2_epochs < 1 or self.window < 2 or self.forget_size < 1:
            raise ValueError("task2_epochs, window - 1 and forget_size must be >= 1")


def _count(percent: float, n: int) -> int:
    return max(1, round(percent / 100 * n))


def trimming_units(harm: dict[str, np.ndarray], config: ApplicationsConfig, n: int) -> list[Unit]:
    """``trim_<method>_<k>_s<seed>`` (the top-k % harm removed), ``trim_random_<k>_s<seed>``, ``trim_none_s<seed>``."""
    rng = np.random.default_rng(config.random_seed)
    order = rng.permutation(n)
    units = [Unit(f"trim_none_s{s}", tuple(range(n)), s) for s in config.seeds]
    for k in config.trim_percents:
        c = _count(k, n)
        removed = {"random": order[:c]}
        removed.update({m: np.argsort(-harm[m], kind="stable")[:c] for m in config.methods})
        for m, r in removed.items():
            keep = tuple(sorted(set(range(n)) - set(r.tolist())))
            units += [Unit(f"trim_{_tag(m)}_{k:g}_s{s}", keep, s) for s in config.seeds]
    return units


def selection_units(harm: dict[str, np.ndarray], config: ApplicationsConfig, n: int) -> list[Unit]:
    """``select_<method>_<k>_s<seed>`` (the k % of least harm kept) and ``select_random_<k>_s<seed>``."""
    rng = np.random.default_rng(config.random_seed + 1)
    order = rng.permutation(n)
    units = []
    for k in config.select_percents:
        c = _count(k, n)
        kept = {"random": order[:c]}
        kept.update({m: np.argsort(harm[m], kind="stable")[:c] for m in config.methods})
        for m, r in kept.items():
            units += [Unit(f"select_{_tag(m)}_{k:g}_s{s}", tuple(sorted(r.tolist())), s) for s in config.seeds]
    return units


def _tag(method: str) -> str:
    return method.replace(":", "-")


def buffers(harm: dict[str, np.ndarray], config: ApplicationsConfig, n: int) -> dict[tuple[str, int], list[int]]:
    """{(method, b): task-1 sentence indices}: the b most helpful (least harm; for ``train_loss`` the b highest loss,
    the hardest examples), b at random, none (b = 0)."""
    rng = np.random.default_rng(config.random_seed + 2)
    order = rng.permutation(n)
    out = {("none", 0): []}
    for b in config.buffer_sizes:
        out[("random", b)] = sorted(order[:b].tolist())
        for m in config.buffer_methods:
            pick = np.argsort(-harm[m], kind="stable")[:b] if m == "train_loss" else np.argsort(harm[m], kind="stable")[:b]
            out[(m, b)] = sorted(pick.tolist())
    return out


def task2_corpus(corpus: Corpus, text8_path: str | Path, window: int, max_words: int | None = None) -> Corpus:
    """The second task: the first ``max_words`` words of the text8-format file (all: None) as ``window``-word
    windows in PTB's vocabulary (others -> ``<unk>``),
    each ending in ``<eos>``; train = the first 90 % of the windows, valid = the rest (it steers task 2's learning
    rate), test = PTB's test split and ptb_valid = PTB's validation split (task 1, measured after task 2)."""
    words = Path(text8_path).read_text().split()[:max_words]
    stoi, unk, eos = corpus.vocab.stoi, corpus.vocab.stoi["<unk>"], corpus.vocab.stoi["<eos>"]
    ids = torch.tensor([stoi.get(w, unk) for w in words], dtype=torch.int64)
    windows = [torch.cat([ids[i : i + window], torch.tensor([eos])]) for i in range(0, len(ids) - window + 1, window)]
    cut = int(0.9 * len(windows))
    name = f"{Path(text8_path).name} ({len(words):,} words) in {corpus.name} vocabulary, {window}-word windows"
    return Corpus(name, corpus.vocab, {"train": windows[:cut], "valid": windows[cut:], "test": corpus.splits["test"],
                                       "ptb_valid": corpus.splits["valid"]})


def buffer_corpus(task2: Corpus, task1: Corpus, indices: list[int], n_train: int) -> Corpus:
    """Task 2's training windows followed by the buffered task-1 sentences (indices into task-1's train[:n_train])."""
    train = task2.splits["train"] + [task1.splits["train"][i] for i in indices]
    from ..cache import fingerprint

    name = f"{task2.name} + buffer of {len(indices)} ({fingerprint(sorted(indices))[:12]})"
    return Corpus(name, task2.vocab, {**task2.splits, "train": train})


def forget_set(config: ApplicationsConfig, n: int) -> list[int]:
    """The ``forget_size`` random training sentences to unlearn (seeded)."""
    rng = np.random.default_rng(config.random_seed + 3)
    return sorted(rng.choice(n, size=config.forget_size, replace=False).tolist())


def _mean_spread(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}


def perplexity_table(records: dict, prefix: str, config: ApplicationsConfig, levels, methods,
                     valid: str = "valid") -> list[dict]:
    """Rows {"method", "level", "seeds", "valid_ppl", "test_ppl"} (mean/std/values over the finished seeds) of
    units ``<prefix>_<method>_<level>_s<seed>`` (level None: ``<prefix>_<method>_s<seed>``); ``valid`` names the
    recorded validation split (``ptb_valid`` for the buffer, whose ``valid`` is task 2's)."""
    rows = []
    for level in levels:
        for m in methods:
            name = f"{prefix}_{_tag(m)}" + ("" if level is None else f"_{level:g}")
            got = [records[f"{name}_s{s}"] for s in config.seeds if f"{name}_s{s}" in records]
            if got:
                rows.append({"method": m, "level": level, "seeds": len(got),
                             "valid_ppl": _mean_spread([float(np.exp(r[f"{valid}_mean"])) for r in got]),
                             "test_ppl": _mean_spread([float(np.exp(r["test_mean"])) for r in got])})
    return rows


def format_perplexity(rows: list[dict], level_name: str) -> str:
    """Markdown: validation and test perplexity, mean +- std over seeds, per method and level."""
    lines = [f"| {level_name} | method | seeds | validation ppl | test ppl |", "|---|---|---|---|---|"]
    for r in rows:
        level = "-" if r["level"] is None else f"{r['level']:g}"
        v, t = r["valid_ppl"], r["test_ppl"]
        lines.append(f"| {level} | {r['method']} | {r['seeds']} | {v['mean']:.1f} +- {v['std']:.1f} | "
                     f"{t['mean']:.1f} +- {t['std']:.1f} |")
    return "\n".join(lines)


def unlearning_measures(model, params: torch.Tensor, corpus: Corpus, forget: list[int], n_train: int) -> dict:
    """Losses (nats/token) of the model with flat parameters ``params``: mean over the forgotten sentences, over the
    validation set, over the test set, and the membership-inference gap (forgotten minus test)."""
    from ..retrain import sentence_losses

    model = _with_params(model, params)
    eos = corpus.vocab.stoi["<eos>"]
    train = corpus.splits["train"][:n_train]
    forgot, _ = sentence_losses(model, [train[i] for i in forget], eos)
    valid, valid_mean = sentence_losses(model, corpus.splits["valid"], eos)
    test, _ = sentence_losses(model, corpus.splits["test"], eos)
    return {"forget_loss": float(forgot.mean()), "valid_loss": float(valid.mean()), "valid_nll_per_token": valid_mean,
            "test_loss": float(test.mean()), "mia_gap": float(forgot.mean() - test.mean())}


def flat_params(model) -> torch.Tensor:
    """(P,) float64 parameters in ``named_parameters`` order (NetworkGrads' layout)."""
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


def _with_params(model, params: torch.Tensor):
    import copy

    out = copy.deepcopy(model).eval()
    start = 0
    with torch.no_grad():
        for p in out.parameters():
            p.copy_(params[start : start + p.numel()].view_as(p).to(p))
            start += p.numel()
    return out


def newton_steps(model, corpus: Corpus, forget: list[int], n_train: int, wconfig, dampings, cache_dir=None) -> dict:
    """{(curvature key, damping): (P,) float64 parameters after one Newton removal step} for EK-FAC, KFAC, the
    diagonal true Fisher and EF (fitted on the model's ``n_fit`` sentences) and the identity, at lambda_0 and each
    damping of ``dampings``; plus the damping lambda_0 under key ("default", value)."""
    from ..curvature.base import IdentityCurvature
    from ..curvature.network_kfac import (
        diagonal_fisher,
        ekfac_network_curvature,
        fit_network_kfac,
        kfac_network_curvature,
    )
    from ..datamodels import gradient_sums
    from ..influence import newton_removal
    from ..network import NetworkGrads

    model = model.eval()
    eos = corpus.vocab.stoi["<eos>"]
    train = corpus.splits["train"][:n_train]
    fit = dict(n_fit=wconfig.n_fit, chunk_size=wconfig.chunk_size, seed=wconfig.seed, cache_dir=cache_dir)
    factors = fit_network_kfac(model, train, eos, labels="model", mc_samples=wconfig.mc_samples, **fit)
    net = NetworkGrads(model, eos)
    curvatures = {"ekfac": ekfac_network_curvature(factors), "kfac": kfac_network_curvature(factors),
                  "identity": IdentityCurvature(net.p)}
    for labels in ("model", "data"):
        c = diagonal_fisher(model, train, eos, labels=labels, mc_samples=wconfig.mc_samples, **fit)
        curvatures[c.name] = c
    default = wconfig.alpha * curvatures["ekfac"].mean_eigenvalue()
    forgotten = [train[i] for i in forget]
    removed = gradient_sums(net, forgotten, np.ones((1, len(forgotten))), wconfig.chunk_size,
                            desc="forgotten gradients").sums[0]
    theta = flat_params(model)
    out = {("default", default): None}
    for key, c in curvatures.items():
        for d in [default, *map(float, dampings)]:
            out[(key, d)] = newton_removal(theta, removed.to(theta), n_train, c, d)
    return out


def unlearning_table(model, corpus: Corpus, forget: list[int], n_train: int, steps: dict, retrained: dict,
                     original_seed: int) -> dict:
    """Rows of every Newton step and of the original model against the retrained models ({seed: model}): the
    measures of :func:`unlearning_measures`, and the parameter distance to the retrained model of
    ``original_seed`` (the same initialisation and batch order as the original)."""
    theta = flat_params(model)
    ref = flat_params(retrained[original_seed]) if original_seed in retrained else None
    rows = []

    def row(name, damping, params):
        r = {"method": name, "damping": damping, **unlearning_measures(model, params, corpus, forget, n_train)}
        r["distance_to_retrained"] = None if ref is None else float((params - ref).norm())
        rows.append(r)

    row("original", None, theta)
    for (key, d), params in steps.items():
        if key != "default":
            row(key, d, params)
    retrain_rows = [{"seed": s, **unlearning_measures(m, flat_params(m), corpus, forget, n_train)}
                    for s, m in sorted(retrained.items())]
    spread = None
    if len(retrained) > 1 and ref is not None:
        spread = [float((flat_params(m) - ref).norm()) for s, m in sorted(retrained.items()) if s != original_seed]
    summary = {k: _mean_spread([r[k] for r in retrain_rows]) for k in ("forget_loss", "valid_loss", "test_loss",
                                                                          "mia_gap")} if retrain_rows else {}
    return {"rows": rows, "retrained": retrain_rows, "retrained_summary": summary,
            "retrained_seed_distance": spread, "forget_size": len(forget)}


def format_unlearning(table: dict) -> str:
    """Markdown: each Newton step and the original, beside the retrained models' mean +- std."""
    lines = ["| model | damping | distance to retrained (same seed) | loss on forgotten | validation loss | "
             "membership gap (forgotten - test) |", "|---|---|---|---|---|---|"]
    for r in table["rows"]:
        dist = "-" if r["distance_to_retrained"] is None else f"{r['distance_to_retrained']:.3g}"
        damp = "-" if r["damping"] is None else f"{r['damping']:.2g}"
        lines.append(f"| {r['method']} | {damp} | {dist} | {r['forget_loss']:.4f} | {r['valid_loss']:.4f} | "
                     f"{r['mia_gap']:+.4f} |")
    s = table["retrained_summary"]
    if s:
        spread = table["retrained_seed_distance"]
        lines.append(f"| retrained ({len(table['retrained'])} seeds) | - | "
                     f"{'-' if not spread else f'{np.mean(spread):.3g} (between seeds)'} | "
                     f"{s['forget_loss']['mean']:.4f} +- {s['forget_loss']['std']:.4f} | "
                     f"{s['valid_loss']['mean']:.4f} +- {s['valid_loss']['std']:.4f} | "
                     f"{s['mia_gap']['mean']:+.4f} +- {s['mia_gap']['std']:.4f} |")
    return "\n".join(lines)


def buffer_spec(spec: RetrainSpec, config: ApplicationsConfig, n: int) -> RetrainSpec:
    """The second task's training configuration: ``n`` training sentences (windows + buffer), task2_epochs."""
    return dataclasses.replace(spec, n_train=n, epochs=config.task2_epochs)


def save_json(path: Path, data: dict) -> None:
    from ..io import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, default=float)))


def archived_rankings(base, description: dict):
    """(scores, dampings) kept by :func:`archive_rankings` at ``base`` (``base.npz``, ``base.json``; a Path) for the
    same description, or None (absent, or written for another model or setting)."""
    if base is None or not base.with_suffix(".json").is_file() or not base.with_suffix(".npz").is_file():
        return None
    stored = json.loads(base.with_suffix(".json").read_text())
    if stored["description"] != json.loads(json.dumps(description)):
        log(f"{base}.json was written for another model or setting: the rankings are computed again")
        return None
    from ..io import file_sha256

    if stored.get("npz_sha256") != file_sha256(base.with_suffix(".npz")):
        log(f"{base}.npz is not the file {base}.json describes: the rankings are computed again")
        return None
    with np.load(base.with_suffix(".npz")) as arrays:
        return {k: arrays[k] for k in stored["description"]["methods"]}, stored["dampings"]


def archive_rankings(base, description: dict, scores: dict, dampings: dict) -> None:
    """Keep the rankings the application units are built from in the repository: ``<base>.npz`` (each method's
    (n_train,) float64 harm scores) and ``<base>.json`` (the description, the dampings and the npz file's SHA-256),
    written atomically, the JSON last. ``scores``: {method: (n_train,) float64}; ``description``: JSON values (the
    entry point names the full-data model's ``weights_sha256`` and the settings)."""
    from ..io import atomic_write, file_sha256

    def write_arrays(tmp):
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **scores)

    atomic_write(base.with_suffix(".npz"), write_arrays)
    digest = file_sha256(base.with_suffix(".npz"))
    atomic_write(base.with_suffix(".json"), lambda tmp: tmp.write_text(
        json.dumps({"description": description, "npz_sha256": digest, "dampings": dampings}, indent=1)))
