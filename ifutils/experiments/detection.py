"""Corrupted-sentence detection on the whole network (issue 16, item 1): does influence find corrupted training data
better than Hessian-free gradient outliers (Chhabra et al. 2024, Outlier Gradient Analysis) on an LSTM LM?

For each corruption kind (:mod:`ifutils.corruption`) and seed s: ``fraction`` of the first ``n_train`` PTB training
sentences are corrupted (draw seeded by s), the small model of :class:`~ifutils.retrain.RetrainSpec` is trained on
the corrupted set (training seed s), and every training sentence is ranked by

* **self-influence** g_i^T (C + lambda I)^{-1} g_i (:func:`ifutils.self_influence.self_influence`) under EK-FAC and
  KFAC (true-Fisher labels), the diagonal true Fisher and the diagonal EF, the identity, and the exact Hessian of the
  512-coordinate subset (``subset_hessian``; damped to positive definiteness: lambda = max(lambda_0, 2 |lambda_min|));
* **influence on the clean validation loss**, I_i = -g_i^T (C + lambda I)^{-1} g_val (positive = harmful), for the
  same curvatures;
* the **Outlier Gradient Analysis** scores: the L2 and L1 norms of g_i and an isolation forest (scikit-learn) on the
  Kronecker-projected gradients (:class:`~ifutils.datamodels.KroneckerProjection`);
* the **training loss** of the sentence under the trained model.

lambda_0 = alpha x the mean eigenvalue of EK-FAC (the whole-network study's default). Scores are "higher = flagged
first". Reported per ranking: AUROC, average precision and recall after inspecting 5 %, 10 %, 20 % of the training
set (:func:`ifutils.metrics.detection_metrics`), mean and spread over seeds.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..cache import ChunkCache
from ..config import param, validate_fields
from ..corruption import KINDS, corrupt
from ..data import Corpus
from ..metrics import detection_metrics
from ..progress import log
from ..retrain import RetrainSpec, Unit, select_train, sentence_losses, train_unit

CURVATURES = ("ekfac", "kfac", "mc_fisher_k1_diag", "ef_diag", "identity", "subset_hessian")
"""Curvature keys whose self-influence and validation influence are ranked (labels: ifutils.curvature.labels)."""
HESSIAN_FREE = ("grad_l2", "grad_l1", "isolation_forest", "train_loss")


@dataclass
class DetectionConfig:
    """The corruption benchmark's design (the model is the :class:`~ifutils.retrain.RetrainSpec` beside it)."""

    fraction: float = param(0.05, "fraction of the n_train training sentences corrupted")
    kinds: tuple[str, ...] = param(KINDS, "corruption kinds (ifutils.corruption)")
    seeds: tuple[int, ...] = param((0, 1), "seeds: each draws the corruption and trains one model")
    inspected: tuple[float, ...] = param((0.05, 0.1, 0.2), "fractions of the training set inspected (recall)")
    k_out: int = param(32, "isolation forest features: projected rows per tensor")
    k_in: int = param(32, "isolation forest features: projected columns per tensor")
    subset_coords: int = param(512, "coordinates of the subset Hessian")

    def __post_init__(self):
        validate_fields(self)
        if unknown := [k for k in self.kinds if k not in KINDS]:
            raise ValueError(f"unknown corruption kinds {unknown}; choose from {', '.join(KINDS)}")
        if not 0 < self.fraction < 1 or not self.seeds:
            raise ValueError("fraction must be in (0, 1) and seeds non-empty")


def corrupted_corpus(corpus: Corpus, spec: RetrainSpec, config: DetectionConfig, kind: str, seed: int
                     ) -> tuple[Corpus, np.ndarray]:
    """The corpus whose train split is the first n_train sentences with ``fraction`` of them corrupted (named after
    the corruption), and the corrupted indices."""
    train = corpus.splits["train"][: spec.n_train]
    eos = corpus.vocab.stoi["<eos>"]
    new, chosen = corrupt(train, config.fraction, kind, len(corpus.vocab), eos, seed)
    name = f"{corpus.name} train[:{spec.n_train}] {kind}-corrupted {config.fraction:g} seed {seed}"
    return Corpus(name, corpus.vocab, {**corpus.splits, "train": new}, corpus.window), chosen


def detection_units(config: DetectionConfig) -> list[tuple[str, int]]:
    """(kind, seed) of every model, seed-major (a stopped study holds every kind of the first seeds)."""
    return [(kind, s) for s in config.seeds for kind in config.kinds]


def unit_name(kind: str, seed: int) -> str:
    return f"{kind}_s{seed}"


def train_models(corpus: Corpus, spec: RetrainSpec, config: DetectionConfig, root: Path, shard=(0, 1),
                 device="cpu", skip: set[str] = frozenset()) -> list[str]:
    """Train (or resume, or skip) every model of this shard (unit j belongs to shard j mod k) but those named in
    ``skip`` (scored before); returns the names of the shard's models finished here or before (a model another
    process is training is left to it)."""
    from ..retrain import train_each

    torch.set_num_threads(spec.threads)
    i, k = shard
    mine = [u for j, u in enumerate(detection_units(config)) if j % k == i and unit_name(*u) not in skip]

    def job(kind, seed):
        data, _ = corrupted_corpus(corpus, spec, config, kind, seed)
        return train_unit(data, spec, Unit(unit_name(kind, seed), tuple(range(spec.n_train)), seed), root, device)

    _, done = train_each([(unit_name(kind, seed), lambda kind=kind, seed=seed: job(kind, seed)) for kind, seed in mine],
                         f"corrupted models (shard {i}/{k})")
    return done


def rankings(model, data: Corpus, spec: RetrainSpec, config: DetectionConfig, wconfig, cache_dir=None,
             stages=None, compute: bool = True) -> tuple[dict[str, np.ndarray], dict[str, float]] | None:
    """The rankings of one trained model (module docstring), cached by the model's weights and the settings.

    Returns:
        (scores, dampings): scores {ranking name: (n_train,) float64, higher = flagged first}, names ``self:<key>``,
        ``valid:<key>`` and the Hessian-free ones; dampings {"damping": lambda_0 of the whole-network curvatures,
        "subset_damping": the subset Hessian's}. With ``compute=False``: the cached pair, or None when not cached
        (nothing is computed; for status reports).
    """
    from ..curvature.exact import hessian_and_ggn
    from ..curvature.network_kfac import (
        _fit_sentences,
        diagonal_fisher,
        ekfac_network_curvature,
        fit_network_kfac,
        kfac_network_curvature,
    )
    from ..curvature.base import IdentityCurvature
    from ..datamodels import KroneckerProjection
    from ..influence import outlier_scores
    from ..network import NetworkGrads
    from ..scoring import score_all
    from ..self_influence import flat_offsets, self_influence
    from ..subset import SubsetLoss, default_subset
    from .whole_network import Stages, query_gradients

    stages = stages or Stages()
    model = model.eval()
    eos = data.vocab.stoi["<eos>"]
    train, valid = data.splits["train"][: spec.n_train], data.splits["valid"]
    cache = None
    if cache_dir is not None:
        cache = ChunkCache(cache_dir, {"stage": "detection rankings", "config": asdict(config), "n_fit": wconfig.n_fit,
                                       "alpha": wconfig.alpha, "seed": wconfig.seed, "chunk_size": wconfig.chunk_size},
                           dict(model.named_parameters()), train, code=("ifutils.self_influence", "ifutils.datamodels",
                                                                        rankings))
        stored = cache.get("rankings")
        if stored is not None:
            scores = {k: v.numpy() for k, v in stored.items()}
            damping, sub_damping = scores.pop("dampings").tolist()
            return scores, {"damping": damping, "subset_damping": sub_damping}
    if not compute:
        return None
    net = NetworkGrads(model, eos)
    fit_args = dict(n_fit=wconfig.n_fit, chunk_size=wconfig.chunk_size, seed=wconfig.seed, cache_dir=cache_dir)
    with stages("KFAC + EK-FAC factors"):
        factors = fit_network_kfac(model, train, eos, labels="model", mc_samples=wconfig.mc_samples, **fit_args)
    curvatures = {"ekfac": ekfac_network_curvature(factors), "kfac": kfac_network_curvature(factors)}
    for labels in ("model", "data"):
        with stages(f"diagonal Fisher ({labels} labels)"):
            c = diagonal_fisher(model, train, eos, labels=labels, mc_samples=wconfig.mc_samples, **fit_args)
        curvatures[c.name] = c
    curvatures["identity"] = IdentityCurvature(net.p)
    damping = wconfig.alpha * curvatures["ekfac"].mean_eigenvalue()
    subset = default_subset(model, "recurrent", config.subset_coords, seed=wconfig.seed)
    offsets = flat_offsets(net)
    idx = torch.cat([offsets[n] + subset.indices[n] for n in subset.names])
    with stages("subset Hessian"):
        hess = hessian_and_ggn(SubsetLoss(model, subset, eos, dtype=torch.float64),
                               _fit_sentences(train, wconfig.n_fit, wconfig.seed))[0]
    sub_damping = max(damping, 2 * max(0.0, -float(hess.eigvalsh()[0])))
    projection = KroneckerProjection(net.shapes, config.k_out, config.k_in, seed=wconfig.seed)
    with stages("self-influence of every training sentence"):
        self_inf = self_influence(net, train, curvatures, {k: [damping] for k in [*curvatures, "subset_hessian"]},
                                  wconfig.chunk_size, restricted={"subset_hessian": (idx, hess)},
                                  projection=projection)
    with stages("influence on the validation loss"):
        g_val = query_gradients(net, valid, [], wconfig.chunk_size)[0]
        qs = [curvatures[k].solve(g_val.double(), damping).float() for k in CURVATURES[:-1]]
        q_sub = torch.zeros(net.p)
        q_sub[idx] = hess.solve(g_val[idx].double(), sub_damping).float()
        scores_dir = (Path(cache_dir) / "detection_scores" / cache.key if cache is not None
                      else Path(tempfile.mkdtemp(prefix="detection_scores_")))
        valid_inf = np.asarray(score_all(model, train, eos, torch.stack([*qs, q_sub]), scores_dir,
                                         chunk_size=wconfig.chunk_size))
    with stages("isolation forest and training loss"):
        forest = outlier_scores(torch.as_tensor(self_inf["features"]), seed=wconfig.seed)["isolation forest"]
        losses, _ = sentence_losses(model, train, eos)
    out = {f"self:{k}": self_inf[k][:, 0] for k in CURVATURES}
    out.update({f"valid:{k}": valid_inf[:, j].astype(np.float64) for j, k in enumerate(CURVATURES)})
    out.update({"grad_l2": self_inf["grad_l2"][:, 0], "grad_l1": self_inf["grad_l1"][:, 0],
                "isolation_forest": forest.numpy(), "train_loss": losses})
    if cache is not None:
        stored = {k: torch.as_tensor(np.asarray(v, dtype=np.float64)) for k, v in out.items()}
        cache.put("rankings", {**stored, "dampings": torch.tensor([damping, sub_damping], dtype=torch.float64)})
    log(f"rankings done (damping {damping:.3g}, subset damping {sub_damping:.3g})")
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}, {"damping": damping,
                                                                          "subset_damping": sub_damping}


def detection_table(per_model: dict[tuple[str, int], dict], config: DetectionConfig) -> dict:
    """{kind: {ranking: {"auroc", "average_precision", "recall_at": {f: ...}} each as {"mean", "std", "values"}}}
    over the seeds of ``per_model`` ({(kind, seed): {ranking: detection_metrics dict}})."""
    out = {}
    for kind in config.kinds:
        runs = [m for (k, _), m in sorted(per_model.items()) if k == kind]
        if not runs:
            continue
        table = {}
        for name in runs[0]:
            entry = {}
            for metric in ("auroc", "average_precision"):
                values = [r[name][metric] for r in runs]
                entry[metric] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}
            entry["recall_at"] = {}
            for f in runs[0][name]["recall_at"]:
                values = [r[name]["recall_at"][f] for r in runs]
                entry["recall_at"][f] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}
            table[name] = entry
        out[kind] = {"seeds": len(runs), "rankings": table}
    return out


def score_models(corpus: Corpus, spec: RetrainSpec, config: DetectionConfig, wconfig, root: Path, cache_dir,
                 on_model=None, scored: dict | None = None) -> dict:
    """Rankings and detection metrics of every trained model (models not trained yet are left out).

    Args:
        on_model: called as ``on_model(per_model, info)`` after each model (to write the results file).
        scored: {model name: {"metrics": {ranking: detection_metrics dict}, "info": dict}} of models scored in an
            earlier run (the ``per_model`` and ``models`` of a results file of the same design): kept as they are,
            neither loaded nor scored again (their checkpoints may be gone: a fresh clone).
    Returns:
        {"table": :func:`detection_table`, "models": {name: info}, "per_model": {name: {ranking: metrics}}}.
    """
    from ..io import load_checkpoint
    from ..retrain import MODEL_FILE, RECORD_FILE
    from .whole_network import Stages

    per_model, info = {}, {}
    for kind, seed in detection_units(config):
        name = unit_name(kind, seed)
        if scored and name in scored:
            per_model[(kind, seed)], info[name] = scored[name]["metrics"], scored[name]["info"]
            continue
        if not (root / name / RECORD_FILE).is_file():
            continue
        data, chosen = corrupted_corpus(corpus, spec, config, kind, seed)
        model, _, _ = load_checkpoint(root / name / MODEL_FILE)
        stages = Stages()
        ranks, dampings = rankings(model, select_train(data, spec.n_train, range(spec.n_train)), spec, config,
                                   wconfig, cache_dir, stages)
        truth = np.zeros(spec.n_train, dtype=bool)
        truth[chosen] = True
        per_model[(kind, seed)] = {r: detection_metrics(v, truth, config.inspected) for r, v in ranks.items()}
        record = json.loads((root / name / RECORD_FILE).read_text())
        info[name] = {"corrupted": len(chosen), **dampings,
                      "valid_ppl": float(np.exp(record["valid_mean"])), "stages": stages.records}
        if on_model is not None:
            on_model(per_model, info)
    return {"table": detection_table(per_model, config), "models": info,
            "per_model": {unit_name(*key): metrics for key, metrics in per_model.items()}}


def scored_models(path, header: dict) -> dict:
    """{model name: {"metrics", "info"}} of the models that the results file ``path`` already scored (its
    ``per_model`` and ``models``), for :func:`score_models`'s ``scored``; empty when the file is missing, has no
    per-model metrics, or was written for another configuration: ``header`` ({"spec" without ``threads``,
    "config", "whole_network_config"}, JSON values) must equal the file's (its spec's ``threads`` ignored)."""
    path = Path(path)
    if not path.is_file():
        return {}
    stored = json.loads(path.read_text())
    spec = {k: v for k, v in (stored.get("spec") or {}).items() if k != "threads"}
    if {k: (spec if k == "spec" else stored.get(k)) for k in header} != header:
        return {}
    per_model = stored.get("per_model", {})
    return {name: {"metrics": per_model[name], "info": info} for name, info in stored.get("models", {}).items()
            if name in per_model}


def _check_metric(metric: str) -> None:
    if metric not in ("auroc", "average_precision") and not (
            isinstance(metric, str) and metric.startswith("recall@") and metric[7:].replace(".", "", 1).isdigit()):
        raise ValueError(f"unknown metric {metric!r}; pass 'auroc', 'average_precision' or 'recall@<f>' with f one "
                         f"of the inspected fractions, e.g. 'recall@0.1'")


def _metric_entry(entry: dict, metric: str) -> dict:
    """{"mean", "std", "values"} of ``metric`` in one ranking's entry of :func:`detection_table`."""
    return entry["recall_at"][repr(float(metric[7:]))] if metric.startswith("recall@") else entry[metric]


def format_detection(table: dict, metric: str = "auroc") -> str:
    """Markdown: one row per ranking, one column per corruption kind: mean +- std over seeds of ``metric``
    (``auroc``, ``average_precision`` or ``recall@<f>``; another raises ValueError)."""
    from ..curvature.labels import label

    kinds = list(table)
    if not kinds:
        return "(no model scored yet)"
    names = list(table[kinds[0]]["rankings"])

    def shown(name):
        if ":" in name:
            what, key = name.split(":")
            return f"{'self-influence' if what == 'self' else 'influence on validation loss'}, {label(key)}"
        return {"grad_l2": "OGA: gradient L2 norm", "grad_l1": "OGA: gradient L1 norm",
                "isolation_forest": "OGA: isolation forest (projected gradients)", "train_loss": "training loss"}[name]

    _check_metric(metric)

    def value(entry):
        v = _metric_entry(entry, metric)
        return f"{v['mean']:.3f} +- {v['std']:.3f}"

    lines = ["| ranking | " + " | ".join(f"{k} ({table[k]['seeds']} seeds)" for k in kinds) + " |",
             "|---" * (len(kinds) + 1) + "|"]
    for name in names:
        lines.append(f"| {shown(name)} | " + " | ".join(value(table[k]["rankings"][name]) for k in kinds) + " |")
    return "\n".join(lines)


OGA = ("grad_l2", "grad_l1", "isolation_forest")
"""The Outlier Gradient Analysis rankings (Chhabra et al. 2024): Hessian-free."""


def oga_comparison(table: dict, metric: str = "auroc") -> dict:
    """The claim of Outlier Gradient Analysis (Chhabra et al. 2024, arXiv 2405.03869: Hessian-free gradient outliers
    detect detrimental samples as well as influence functions, or better), tested per corruption kind.

    For each kind of :func:`detection_table`'s ``table``: the best self-influence ranking, the best
    validation-influence ranking and the best OGA ranking (:data:`OGA`), each chosen by its mean ``metric`` over
    seeds (the same optimistic choice for both sides), and the per-seed differences d_s = metric(best influence
    ranking, either kind) - metric(best OGA ranking), paired by seed (the same corrupted model).

    Args:
        table: {kind: {"seeds", "rankings": {name: {metric: {"mean", "std", "values"}}}}}.
        metric: ``"auroc"``, ``"average_precision"`` or ``"recall@<f>"``.
    Returns:
        {kind: {"self", "valid", "oga": (name, mean), "influence": the better of self / valid, "differences": [d_s],
        "verdict": "held" (OGA at least as good in every seed: max d_s <= 0), "did not hold" (influence better in
        every seed: min d_s > 0) or "mixed" (the seeds disagree)}}.
    Raises:
        ValueError: an unknown metric.
        KeyError: a kind without the OGA rankings or without any influence ranking; a recall fraction not inspected.
    """
    _check_metric(metric)
    values = lambda entry: _metric_entry(entry, metric)  # noqa: E731
    out = {}
    for kind, t in table.items():
        r = t["rankings"]
        best = lambda names: max(names, key=lambda n: values(r[n])["mean"])  # noqa: E731
        picks = {"self": best([n for n in r if n.startswith("self:")]),
                 "valid": best([n for n in r if n.startswith("valid:")]), "oga": best(list(OGA))}
        influence = max((picks["self"], picks["valid"]), key=lambda n: values(r[n])["mean"])
        d = [a - b for a, b in zip(values(r[influence])["values"], values(r[picks["oga"]])["values"])]
        verdict = "held" if max(d) <= 0 else "did not hold" if min(d) > 0 else "mixed"
        out[kind] = {**{k: (n, values(r[n])["mean"]) for k, n in picks.items()},
                     "influence": (influence, values(r[influence])["mean"]), "differences": d, "verdict": verdict}
    return out


def format_oga_comparison(table: dict, metric: str = "auroc") -> str:
    """Markdown of :func:`oga_comparison`: one row per corruption kind."""
    from ..curvature.labels import label

    shown = lambda name: f"{label(name.split(':')[1])}" if ":" in name else name  # noqa: E731
    rows = ["| corruption | best self-influence | best influence on validation loss | best OGA | influence - OGA "
            "per seed | OGA as good or better? |", "|---|---|---|---|---|---|"]
    for kind, c in oga_comparison(table, metric).items():
        cell = lambda key: f"{shown(c[key][0])} {c[key][1]:.3f}"  # noqa: E731
        rows.append(f"| {kind} | {cell('self')} | {cell('valid')} | {cell('oga')} | "
                    f"{', '.join(f'{d:+.3f}' for d in c['differences'])} | {c['verdict']} |")
    return "\n".join(rows)
