"""The linear datamodeling study on the whole network (issue 15): models retrained from scratch on random halves.

Stages (each resumable per model, :mod:`ifutils.retrain`):

1. ``choose``: the model of :class:`~ifutils.retrain.RetrainSpec` trained on all ``n_train`` sentences (seed 0) for
   ``max_epochs`` epochs, keeping every epoch; the number of epochs of every retrained model is the one with the
   lowest validation perplexity (never the test split). Its checkpoint at that epoch is the model whose influence
   scores predict the retrained losses.
2. ``train``: M random subsets of fraction beta (:func:`~ifutils.retrain.random_subsets`), each retrained from
   scratch with every seed of ``seeds``: M x S models, listed subset-major so that a stopped study holds complete
   subsets; every validation sentence's loss under each model is recorded.

The LDS itself (Park et al. 2023, eq. 4) is computed from the records and the influence scores of the full-data
model; the records hold every validation sentence's loss, so the queries can be chosen afterwards.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..config import param, validate_fields
from ..data import Corpus
from ..io import atomic_write
from ..retrain import RetrainSpec, Unit, random_subsets, train_unit
from ..train import TrainConfig, train_language_model

CHOICE_FILE = "epochs.json"


@dataclass
class LdsConfig:
    """The study's design (the model's configuration is the :class:`~ifutils.retrain.RetrainSpec` beside it)."""

    subsets: int = param(100, "M, random training subsets, each retrained with every seed")
    seeds: tuple[int, ...] = param((0, 1), "training seeds of every subset (S >= 2 gives the noise ceiling)")
    beta: float = param(0.5, "fraction of the n_train sentences in each subset")
    subset_seed: int = param(0, "seeds the subset draws")
    max_epochs: int = param(8, "epochs of the full-data model the epoch count is chosen from")

    def __post_init__(self):
        validate_fields(self)
        if self.subsets < 1 or self.max_epochs < 1:
            raise ValueError(f"subsets and max_epochs must be >= 1, got {self.subsets}, {self.max_epochs}")
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise ValueError(f"seeds must be one or more distinct ints, got {self.seeds}")
        if not 0 < self.beta < 1:
            raise ValueError(f"beta must be in (0, 1), got {self.beta}")


def choose_epochs(corpus: Corpus, spec: RetrainSpec, config: LdsConfig, root: str | Path, device="cpu") -> dict:
    """Stage 1: train (or resume) the full-data model and choose the epoch count by validation perplexity.

    Writes ``<root>/epochs.json``: the history, the chosen epoch count and the chosen checkpoint's path
    (``<root>/full/model_epoch<k>.pt``). Returns that dict.
    """
    root = model_root(root, spec)
    from ..retrain import select_train

    data = select_train(corpus, spec.n_train, range(spec.n_train))
    tc = TrainConfig(epochs=config.max_epochs, batch_size=spec.batch_size, lr=spec.lr, seed=0, keep_epochs=True)
    import torch

    torch.set_num_threads(spec.threads)
    _, history = train_language_model(data, spec.model_config(len(corpus.vocab)), tc, root / "full" / "model.pt",
                                      device)
    best = int(np.argmin([h["valid_ppl"] for h in history])) + 1
    choice = {"spec": asdict(spec), "max_epochs": config.max_epochs, "history": history, "epochs": best,
              "checkpoint": str(root / "full" / f"model_epoch{best}.pt")}
    atomic_write(root / CHOICE_FILE, lambda tmp: tmp.write_text(json.dumps(choice, indent=1)))
    return choice


def study_units(spec: RetrainSpec, config: LdsConfig) -> list[Unit]:
    """Stage 2's units, subset-major: ``m<mmm>_s<seed>`` for every subset m and seed."""
    subsets = random_subsets(spec.n_train, config.subsets, config.beta, config.subset_seed)
    return [Unit(f"m{m:03d}_s{s}", tuple(int(i) for i in idx), s) for m, idx in enumerate(subsets)
            for s in config.seeds]


def model_root(root: str | Path, spec: RetrainSpec) -> Path:
    """``<root>/<fingerprint of the spec without its epochs>``: the full-data model of stage 1 lives here."""
    from ..cache import fingerprint

    fields = {k: v for k, v in spec.identity().items() if k != "epochs"}
    return Path(root) / f"w{spec.hidden}_n{spec.n_train}_{fingerprint(fields)[:8]}"


def study_root(root: str | Path, spec: RetrainSpec, config: LdsConfig) -> Path:
    """The directory of one design, ``<model root>/e<epochs>_beta<beta>_subsets<seed>``: another design (epochs,
    beta, subset draw) never mixes into it; more subsets or seeds add units to the same directory."""
    return model_root(root, spec) / f"e{spec.epochs}_beta{config.beta:g}_subsets{config.subset_seed}"


def train_study(corpus: Corpus, spec: RetrainSpec, config: LdsConfig, root: str | Path, shard=(0, 1),
                device="cpu", archive: str | Path | None = None) -> list[str]:
    """Stage 2: every unit of this shard (see :func:`ifutils.retrain.run_units`; ``archive``: the records kept in
    the repository, whose units are restored instead of trained)."""
    from ..retrain import run_units

    return run_units(corpus, spec, study_units(spec, config), study_root(root, spec, config), shard, device, archive)


__all__ = ["LdsConfig", "choose_epochs", "study_root", "study_units", "train_study", "train_unit"]


# ------------------------------------------------------------------------------------------- predictions and LDS


def query_indices(corpus: Corpus, n_queries: int, seed: int = 0) -> list[int]:
    """The validation sentences whose retrained losses are predicted (seeded draw without replacement)."""
    import torch

    valid = corpus.splits["valid"]
    if not 1 <= n_queries <= len(valid):
        raise ValueError(f"n_queries must be in [1, {len(valid)}], got {n_queries}")
    return torch.randperm(len(valid), generator=torch.Generator().manual_seed(seed))[:n_queries].tolist()


def measured_losses(records: dict, units: list[Unit], seeds, queries: list[int], n_train: int
                    ) -> tuple[np.ndarray, np.ndarray, list]:
    """(masks (M, n_train) bool, losses (M, S, 1 + Q) nats/token, subset names) from the units' records.

    Column 0 is the mean validation loss (1/n_val) sum_j l_j (the mean of the per-sentence losses, the objective
    whose gradient is the mean-validation query of :func:`~ifutils.experiments.whole_network.query_gradients`),
    columns 1.. the losses of the validation sentences ``queries``; NaN for a unit without a record.
    """
    subsets = list(dict.fromkeys(u.name.rsplit("_s", 1)[0] for u in units))
    by_name = {u.name: u for u in units}
    masks = np.zeros((len(subsets), n_train), dtype=bool)
    losses = np.full((len(subsets), len(seeds), 1 + len(queries)), np.nan)
    for m, subset in enumerate(subsets):
        masks[m, list(by_name[f"{subset}_s{seeds[0]}"].indices)] = True
        for k, seed in enumerate(seeds):
            r = records.get(f"{subset}_s{seed}")
            if r is not None:
                v = np.asarray(r["valid_losses"])
                losses[m, k] = np.concatenate([[v.mean()], v[queries]])
    return masks, losses, subsets


CEILING_FIELDS = ("ceiling", "ceiling_ci", "ceiling_ci_two_way", "ceiling_mean_target", "ceiling_mean_target_ci")


def lds_table(predictions: dict, losses: np.ndarray, n_solver: int, seed: int = 0) -> dict:
    """The LDS of every method and damping (Park et al. 2023, eq. 4; :func:`ifutils.metrics.datamodel_score`).

    Args:
        predictions: {key: {"dampings", "pred" (D, M, W), ...}} of
            :func:`~ifutils.experiments.lds_methods.method_predictions`; column 0 the mean validation loss,
            columns 1.. sentence queries (W = 1 + Q, or 1 + n_solver for the solver methods).
        losses: (M, S, 1 + Q) measured losses (:func:`measured_losses`), NaN for unfinished models.
        n_solver: the first n_solver sentence queries, on which every method is also scored (like for like with
            CG and LiSSA).
    Returns:
        {"<key>@<damping>" (or "<key>" for a damping-free method): {"key", "damping", "default" (True at the
        method's default damping, ``entry["default_damping"]``), "lds", "ci" (queries resampled), "ci_two_way"
        (subsets and queries resampled), the ceiling entries of :func:`ifutils.metrics.datamodel_score` ("ceiling"
        = seed-to-seed, "ceiling_mean_target" = the ceiling for the S-seed mean, with their intervals), "subsets",
        "seeds", "queries", "per_query",
        "validation" (Spearman over subsets of the mean-validation-loss query), "solver_queries" (the LDS on the
        first n_solver queries, with its CI and ceiling)}}.
    """
    from scipy import stats

    from ..metrics import datamodel_score

    done = ~np.isnan(losses).any(axis=(1, 2))
    out, ceilings = {}, {}

    def scored(pred, target):  # the ceiling entries depend on the losses only: computed once per query set
        width = target.shape[2]
        result = datamodel_score(pred, target, seed, ceiling=width not in ceilings)
        if width not in ceilings:
            ceilings[width] = {f: result[f] for f in CEILING_FIELDS}
        return {**result, **ceilings[width]}

    for key, entry in predictions.items():
        for k, d in enumerate(entry["dampings"]):
            pred = entry["pred"][k]
            width = pred.shape[1]
            main = scored(pred[:, 1:], losses[:, :, 1:width])
            small = scored(pred[:, 1 : 1 + n_solver], losses[:, :, 1 : 1 + n_solver])
            valid = float(stats.spearmanr(pred[done, 0], losses[done, :, 0].mean(1))[0])
            name = key if d is None else f"{key}@{d:.3g}"
            default = entry.get("default_damping")
            out[name] = {"key": key, "damping": d, "default": d is not None and default is not None
                         and math.isclose(d, default, rel_tol=1e-9),
                         "queries": width - 1, **{f: main[f] for f in ("lds", "ci", "ci_two_way", *CEILING_FIELDS,
                                                                        "subsets", "seeds", "per_query")},
                         "validation": valid,
                         "solver_queries": {f: small[f] for f in ("lds", "ci", "ci_two_way", "ceiling",
                                                                  "ceiling_mean_target", "subsets")}}
    return out


def _default_index(entry: dict) -> int | None:
    """Index of an entry's default damping in its ``dampings`` (0 for a damping-free method; None when absent)."""
    if entry["dampings"] == [None]:
        return 0
    default = entry.get("default_damping")
    return next((k for k, d in enumerate(entry["dampings"]) if default is not None and d is not None
                 and math.isclose(d, default, rel_tol=1e-9)), None)


def lds_differences(predictions: dict, losses: np.ndarray, references=("identity", "ekfac"), seed: int = 0,
                    resamples: int = 1000, at: str = "default", table: dict | None = None) -> dict:
    """Every method's LDS minus each reference's, with paired intervals
    (:func:`ifutils.metrics.paired_lds_difference`): how much a curvature adds over the gradient dot product, and
    how far each one is from EK-FAC, with the noise the two share cancelled.

    Args:
        predictions: of :func:`~ifutils.experiments.lds_methods.method_predictions` ("pred" (D, M, W)).
        losses: (M, S, 1 + Q) measured losses (column 0 the mean validation loss, left out here).
        references: keys of ``predictions`` to subtract (missing ones are skipped).
        at: "default": every method (the reference too) at its default damping; "best": at the damping of its
            highest LDS in ``table`` (chosen on the same queries: optimistic for both).
        table: :func:`lds_table` of ``predictions`` (needed for ``at="best"``).
    Returns:
        {reference: {key: {"difference", "ci", "ci_two_way", "per_query", "subsets", "queries", "damping",
        "reference_damping"}}}, on the sentence queries both methods predict (the first n_solver for CG and LiSSA);
        methods without a prediction at their default damping (the Hessian by CG where H + lambda_0 I is
        indefinite) are left out of ``at="default"``.
    Raises:
        ValueError: ``at`` not "default" or "best", or "best" without ``table``.
    """
    from ..metrics import paired_lds_difference

    if at not in ("default", "best") or (at == "best" and table is None):
        raise ValueError(f"at must be 'default' or 'best' (with the lds_table as table), got {at!r}")

    def index(key, entry):
        if at == "default":
            return _default_index(entry)
        names = [key if d is None else f"{key}@{d:.3g}" for d in entry["dampings"]]
        return max(range(len(names)), key=lambda k: table[names[k]]["lds"])

    out = {}
    for ref in references:
        if ref not in predictions or (j := index(ref, predictions[ref])) is None:
            continue
        b, rows = predictions[ref]["pred"][j], {}
        for key, entry in predictions.items():
            k = index(key, entry)
            if key == ref or k is None:
                continue
            a = entry["pred"][k]
            width = min(a.shape[1], b.shape[1])
            r = paired_lds_difference(a[:, 1:width], b[:, 1:width], losses[:, :, 1:width], seed, resamples)
            rows[key] = {**r, "queries": width - 1, "damping": entry["dampings"][k],
                         "reference_damping": predictions[ref]["dampings"][j]}
        out[ref] = rows
    return out


def best_dampings(table: dict) -> dict:
    """{key: the entry of its damping with the highest LDS} over the damped entries of :func:`lds_table`."""
    best = {}
    for name, r in table.items():
        if r["damping"] is not None and (r["key"] not in best or r["lds"] > best[r["key"]]["lds"]):
            best[r["key"]] = {"name": name, **{f: r.get(f) for f in ("damping", "lds", "ci", "ci_two_way", "ceiling",
                                                                     "ceiling_mean_target")}}
    return best


def held_out_dampings(table: dict) -> dict:
    """The damping chosen without looking at the queries it is scored on: the queries split into two halves (even
    and odd positions), the damping of highest mean per-query LDS on one half scored on the other, both ways.

    Returns:
        {key: {"lds": mean of the two held-out halves' LDS, "chosen": [damping chosen on the even half, on the odd
        half]}} for every method with two or more dampings (a method's best damping over all queries,
        :func:`best_dampings`, is optimistic by the choice).
    """
    out = {}
    keys = dict.fromkeys(r["key"] for r in table.values() if r["damping"] is not None)
    for key in keys:
        entries = [r for r in table.values() if r["key"] == key and r["damping"] is not None]
        if len(entries) < 2:
            continue
        values = np.array([r["per_query"] for r in entries])  # (D, Q)
        halves = [np.arange(0, values.shape[1], 2), np.arange(1, values.shape[1], 2)]
        scores, chosen = [], []
        for pick, score in ((halves[0], halves[1]), (halves[1], halves[0])):
            k = int(np.argmax(values[:, pick].mean(1)))
            scores.append(float(values[k, score].mean()))
            chosen.append(entries[k]["damping"])
        out[key] = {"lds": float(np.mean(scores)), "chosen": chosen}
    return out


def damping_against_spectrum(results: dict) -> dict:
    """The LDS-maximising damping of each method (:func:`best_dampings`, ``results["best"]``) against the curvature's
    scale on the fit sentences: m = tr(EK-FAC)/P (the default damping's unit, lambda_0 = alpha m), lambda_max of the
    GGN and lambda_min, lambda_max of H (Lanczos, ``results["spectrum"]``, present once a group needed it).

    Returns:
        {"mean_eigenvalue": m, "ggn_lambda_max", "h_lambda_min", "h_lambda_max" (None when unknown),
        "methods": {key: {"damping", "lds", "over_mean": lambda / m, "over_ggn_max": lambda / lambda_max(GGN) or
        None, "above_h_min": lambda > -lambda_min(H) (H + lambda I positive definite) or None, "edge": "low" /
        "high" when the best is the smallest / largest damping of the method's grid (``results["methods"]``; the
        maximum may lie beyond it), else None}}}.
    Raises:
        KeyError: ``results`` without ``default_damping``, ``whole_network_config.alpha`` or ``best``.
    """
    m = results["default_damping"] / results["whole_network_config"]["alpha"]
    spectrum = results.get("spectrum") or {}
    h, f = spectrum.get("H") or {}, spectrum.get("F") or {}
    gmax, hmin = f.get("lambda_max"), h.get("lambda_min")
    methods = {}
    for key, b in results["best"].items():
        d = b["damping"]
        grid = [float(x) for x in (results.get("methods", {}).get(key, {}).get("dampings") or [])]
        edge = None if len(grid) < 2 else ("low" if d <= min(grid) else "high" if d >= max(grid) else None)
        methods[key] = {"damping": d, "lds": b["lds"], "over_mean": d / m,
                        "over_ggn_max": d / gmax if gmax else None,
                        "above_h_min": None if hmin is None else bool(d + hmin > 0), "edge": edge}
    return {"mean_eigenvalue": m, "ggn_lambda_max": gmax, "h_lambda_min": hmin, "h_lambda_max": h.get("lambda_max"),
            "methods": methods}


def format_lds(results: dict) -> str:
    """Markdown of ``results/ptb_lds.json``: the design, the noise ceiling, the LDS of every method at its default
    and best damping (95 % bootstrap intervals over queries), on the solver queries, the solves, and the
    counterfactual removals when present."""
    from ..curvature.labels import label
    from .counterfactual import format_removals

    spec, table = results["spec"], results.get("lds") or {}
    lines = [f"Model: width {spec['hidden']} LSTM LM, the first {spec['n_train']:,} PTB training sentences, "
             f"{spec['epochs']} epochs (chosen by validation on the full-data model). Design: M = {results['M']} random "
             f"subsets of beta = {results['beta']:g}, S = {results['S']} seeds each; **{results['complete_subsets']} "
             f"subsets complete** ({results['finished_models']} models). Queries: {len(results['queries'])} validation "
             f"sentences (LDS mean over them) and the mean validation loss (Spearman over subsets). Default damping "
             f"lambda_0 = {results['default_damping']:.3g} (0.1 x EK-FAC's mean eigenvalue)."]
    if not table:
        return "\n".join(lines + ["", "Fewer than 3 complete subsets: no LDS yet."])
    first = next(iter(table.values()))
    interval = lambda ci: f"[{ci[0]:.3f}, {ci[1]:.3f}]"  # noqa: E731
    two_way = lambda r, f="ci_two_way": f" ({r[f][0]:.2f}, {r[f][1]:.2f})" if r.get(f) else ""  # noqa: E731
    lines += ["", f"Seed-to-seed agreement (one seed's losses predicting the other's, the LDS of a retrained model): "
              f"r = **{first['ceiling']:.3f}** {interval(first['ceiling_ci'])}"
              f"{two_way(first, 'ceiling_ci_two_way')}."]
    if first.get("ceiling_mean_target") is not None:
        lines[-1] += (f" The ceiling of the LDS against the mean of S = {results['S']} seeds (what every method is "
                      f"scored on): an exact predictor of the expected loss reaches sqrt(S r / (1 + (S - 1) r)) per "
                      f"query (Spearman-Brown with the correction for attenuation), **"
                      f"{first['ceiling_mean_target']:.3f}** {interval(first['ceiling_mean_target_ci'])}.")
    lines += ["", "Intervals: [95 % bootstrap over queries] and, where given, (over subsets and queries together). "
              "The best damping is chosen on the same queries it is scored on (optimistic); the held-out column "
              "chooses it on half of the queries and scores it on the other half. (indefinite): C + lambda I has "
              "a negative eigenvalue at that damping.", "",
              "| method | LDS at default damping | LDS at best damping (lambda) | LDS, damping chosen on held-out "
              f"queries | LDS on the first {results['methods_config']['n_solver_queries']} queries (best damping) | "
              "validation-loss query Spearman (best) |", "|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys(r["key"] for r in table.values()))
    fmt = lambda r: f"{r['lds']:.3f} {interval(r['ci'])}{two_way(r)}"  # noqa: E731
    held = held_out_dampings(table)
    rows = []
    for key in keys:
        entries = [r for r in table.values() if r["key"] == key]
        default = next((r for r in entries if r["damping"] is None or r["default"]), None)
        best = max(entries, key=lambda r: r["lds"])
        definite = results.get("methods", {}).get(key, {}).get("meta", {}).get("positive_definite") or {}
        mark = lambda r: " (indefinite)" if r["damping"] is not None and definite.get(  # noqa: E731
            repr(float(r["damping"]))) is False else ""
        where = "" if best["damping"] is None else f" ({best['damping']:.2g})"
        h = f"{held[key]['lds']:.3f}" if key in held else "-"
        shown = f"{fmt(default)}{mark(default)}" if default else "- (not positive definite)"
        rows.append((best["lds"], f"| {label(key)} | {shown} | {fmt(best)}{where}{mark(best)} | {h} | "
                                  f"{best['solver_queries']['lds']:.3f} | {best['validation']:.3f} |"))
    lines += [r for _, r in sorted(rows, key=lambda x: -x[0])]
    for field, title in (("differences", "at the default dampings"),
                         ("differences_best", "at each method's best damping (chosen on the same queries: optimistic "
                                              "for both; the method's damping after \"at\")")):
        differences = results.get(field) or {}
        refs = [r for r in ("identity", "ekfac") if r in differences]
        if not refs:
            continue
        where = (lambda d: f" at {d['damping']:.2g}" if field == "differences_best" and d.get("damping") is not None
                 else "")
        cell = lambda d: (f"{d['difference']:+.3f} {interval(d['ci'])}{two_way(d)}{where(d)}"  # noqa: E731
                          + (f" on {d['queries']} queries" if d["queries"] != len(results["queries"]) else ""))
        lines += ["", f"Paired differences {title} (both methods scored on the same resamples, so the noise they "
                  "share cancels): [95 % over queries] (over subsets and queries).", "",
                  "| method | " + " | ".join(f"minus {label(r)}" for r in refs) + " |",
                  "|---|" + "---|" * len(refs)]
        score = (lambda k: max((x["lds"] for x in table.values() if x["key"] == k), default=-1.0)) \
            if field == "differences_best" else (lambda k: next(
                (x["lds"] for x in table.values() if x["key"] == k and (x["damping"] is None or x["default"])), -1.0))
        for key in sorted({k for r in refs for k in differences[r]} | set(refs), key=lambda k: -score(k)):
            lines.append(f"| {label(key)} | " + " | ".join(
                "-" if key == r else cell(differences[r][key]) if key in differences[r] else "n/a" for r in refs)
                + " |")
    methods = results.get("methods", {})
    for key in ("ggn", "hessian_cg"):
        solves = methods.get(key, {}).get("meta", {}).get("solves")
        if solves:
            lines += ["", f"{label(key)} by multi-shift CG on {methods[key]['meta']['columns']} query columns: "
                      + "; ".join(f"lambda {float(d):.2g}: {sum(s['converged'])}/{len(s['converged'])} converged, "
                                  f"true residual <= {max(s['true_residual']):.1e}" for d, s in solves.items())
                      + (f"; not positive definite (skipped): {', '.join(f'{d:.2g}' for d in methods[key]['meta']['skipped_not_positive_definite'])}"
                         if methods[key]["meta"].get("skipped_not_positive_definite") else "") + "."]
    if results.get("best") and "whole_network_config" in results:
        rel = damping_against_spectrum(results)
        known = lambda x, f: "unknown" if x is None else format(x, f)  # noqa: E731
        lines += ["", f"Best damping against the spectrum (fit sentences): m = tr(EK-FAC)/P = {rel['mean_eigenvalue']:.3g}"
                  f" (lambda_0 = {results['whole_network_config']['alpha']:g} m), lambda_max(GGN) = "
                  f"{known(rel['ggn_lambda_max'], '.3g')}, lambda_min(H) = {known(rel['h_lambda_min'], '.3g')}.", "",
                  "| method | best damping | lambda / m | lambda / lambda_max(GGN) | H + lambda I positive definite |",
                  "|---|---|---|---|---|"]
        for key, r in sorted(rel["methods"].items(), key=lambda kv: -kv[1]["lds"]):
            pd = "unknown" if r["above_h_min"] is None else ("yes" if r["above_h_min"] else "no")
            edge = {"low": " (smallest of the grid)", "high": " (largest of the grid)"}.get(r["edge"], "")
            lines.append(f"| {label(key)} | {r['damping']:.2g}{edge} | {r['over_mean']:.3g} | "
                         f"{known(r['over_ggn_max'], '.3g')} | {pd} |")
    cf = results.get("counterfactual")
    if cf:
        lines += ["", f"**Counterfactual removals** ({cf['finished']} of {cf['models']} models trained): change of the "
                  "query loss (nats/token) after removing the k sentences each method ranks most helpful, against the "
                  "model on all sentences with the same seed.", "", format_removals(cf["table"])]
    return "\n".join(lines)
