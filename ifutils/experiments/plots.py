"""Figures, each written atomically as PNG and returned as a matplotlib Figure for notebooks."""

from __future__ import annotations

import os

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import torch

from ..curvature.labels import label as curvature_label
from ..io import atomic_write
from .comparison import REFERENCE
from .spectrum import preferred_estimates


def save(fig: plt.Figure, path: str | os.PathLike) -> plt.Figure:
    """Write ``fig`` to ``path`` as PNG (150 dpi) via a temporary file."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight"))
    return fig


def training_curves(history: list[dict], label: str, path: str | os.PathLike) -> plt.Figure:
    """Training loss (nats/token) and validation perplexity per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.5, 3.2))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-")
    ax1.set(xlabel="epoch", ylabel="train loss (nats/token)", title=f"{label}: training loss")
    ax2.plot(epochs, [h["valid_ppl"] for h in history], "o-", color="C1")
    ax2.set(xlabel="epoch", ylabel="validation perplexity", title=f"{label}: validation perplexity")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    return save(fig, path)


def score_scatter(reference: torch.Tensor, scores: dict[str, torch.Tensor], label: str, path: str | os.PathLike) -> plt.Figure:
    """One panel per curvature (``scores`` keyed by curvature key, titled by its label): its influence scores
    against the reference (exact Hessian), all
    (train, test) pairs, each axis scaled by its standard deviation (curvatures differ in scale) and
    cut at the 0.5 / 99.5 percentiles so that a few outliers do not hide the bulk."""
    n = len(scores)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    ref = reference.flatten().cpu().numpy()
    ref = ref / ref.std()
    for ax, (name, s) in zip(axes.flat, scores.items()):
        est = s.flatten().cpu().numpy()
        est = est / est.std()
        ax.scatter(ref, est, s=2, alpha=0.3)
        ax.set_xlim(*np.percentile(ref, [0.5, 99.5]))
        ax.set_ylim(*np.percentile(est, [0.5, 99.5]))
        ax.set(title=curvature_label(name), xlabel="exact-Hessian influence / std", ylabel="influence / std")
        ax.title.set_fontsize(9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(label)
    fig.tight_layout()
    return save(fig, path)


def correlation_vs_damping(rows: list[dict], metric: str, label: str, path: str | os.PathLike) -> plt.Figure:
    """``metric`` (e.g. spearman) of each curvature against the exact Hessian, one panel per damping
    mode: absolute damping (x = lambda) and relative damping (x = alpha, lambda = alpha * mean eigenvalue,
    per layer for block-structured curvatures). Damping-free scores (mode "none") are drawn in the absolute
    panel against the reference's lambda, dashed. Grey bands mark dampings where the reference H + lambda I
    is indefinite; one colour and marker per curvature, legend beside the panels."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), sharey=True)
    names = list(dict.fromkeys(r["curvature"] for r in rows if r["curvature"] != REFERENCE))
    style = {n: (plt.cm.tab20(k % 20), "os^vD<>ph*"[k % 10]) for k, n in enumerate(names)}
    for ax, mode in zip(axes, ["absolute", "relative"]):
        sel = [r for r in rows if r["mode"] in ((mode, "none") if mode == "absolute" else (mode,))
               and r["curvature"] != REFERENCE]
        indefinite = [r["value"] for r in sel if r["reference_indefinite"]]
        if indefinite:
            ax.axvspan(min(indefinite), max(indefinite), color="0.85", label="H + lambda I indefinite")
        for name in dict.fromkeys(r["curvature"] for r in sel):
            pts = [(r["value"], r[metric]) for r in sel if r["curvature"] == name]
            color, marker = style[name]
            dashed = any(r["mode"] == "none" for r in sel if r["curvature"] == name)
            ax.plot(*zip(*pts), marker=marker, ls="--" if dashed else "-", color=color, label=curvature_label(name),
                    ms=4, lw=1)
        ax.set_xscale("log")
        ax.set(xlabel="damping lambda" if mode == "absolute" else "alpha (lambda = alpha * mean eigenvalue)",
               title=f"{mode} damping", ylabel=f"{metric} vs exact Hessian")
        ax.grid(alpha=0.3)
    handles = {h.get_label(): h for ax in axes for h in ax.get_legend_handles_labels()[0]}
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(label)
    fig.tight_layout()
    return save(fig, path)


def mc_error(errors: dict[int, float], label: str, path: str | os.PathLike) -> plt.Figure:
    """Relative Frobenius error of the Monte Carlo true Fisher against the closed form, against the number of
    label draws k (log-log), with the 1/sqrt(k) rate of an average of i.i.d. draws through the first point."""
    ks = np.array(list(errors), dtype=float)
    err = np.array(list(errors.values()))
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    ax.loglog(ks, err, "o-", label="||F_k - G||_F / ||G||_F")
    ax.loglog(ks, err[0] * np.sqrt(ks[0] / ks), "k--", lw=1, label="1/sqrt(k)")
    ax.set(xlabel="label draws k", ylabel="relative error", title=f"{label}: MC true Fisher vs closed form")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save(fig, path)


def spectra(eigenvalues: dict[str, torch.Tensor], label: str, path: str | os.PathLike) -> plt.Figure:
    """Sorted eigenvalue magnitudes on a log axis, one series per curvature key (legend: its label); negative
    eigenvalues are drawn as crosses, never dropped; exact zeros (e.g. a PSD spectrum clipped by
    :func:`~ifutils.experiments.comparison.reported_eigenvalues`) are counted in the legend but have no place on
    the log axis."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for k, (name, ev) in enumerate(eigenvalues.items()):
        ev = ev.double().cpu().numpy()[::-1]
        rank = np.arange(1, len(ev) + 1)
        pos, neg = ev > 0, ev < 0
        ax.plot(rank[pos], ev[pos], ".", ms=3, color=f"C{k}",
                label=f"{curvature_label(name)} ({(~pos).sum()} of {len(ev)} <= 0)")
        if neg.any():
            ax.plot(rank[neg], np.abs(ev[neg]), "x", ms=3, color=f"C{k}")
    ax.set_yscale("log")
    ax.set(xlabel="eigenvalue rank", ylabel="|eigenvalue|", title=f"{label}: spectra (x = negative)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save(fig, path)


def retrain_deltas(results: dict, label: str, path: str | os.PathLike, split: str = "valid") -> plt.Figure:
    """Change of validation perplexity after removing each method's top k% and retraining
    (:func:`ifutils.experiments.retrain_check.retrain_check`): bar = mean over seeds of ppl(removed) - ppl(full), error bar = its
    seed-to-seed std, dots = single seeds; the grey band is +- the full-data perplexity's seed-to-seed std, the
    noise floor a change must clear (Basu et al. 2021). Below zero: the removal helped."""
    methods = list(results["methods"])
    fig, ax = plt.subplots(figsize=(1.1 * len(methods) + 2.5, 3.8))
    floor = results["noise_floor"][split]
    ax.axhspan(-floor, floor, color="0.85", label=f"full-data seed std (+-{floor:.2f})")
    for k, m in enumerate(methods):
        entry = results["methods"][m][split]
        ax.bar(k, entry["mean"], color=f"C{k}", alpha=0.7, yerr=entry["std"] or 0, capsize=4)
        ax.plot([k] * len(entry["per_seed"]), list(entry["per_seed"].values()), "k.", ms=5)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(methods)), [m if m == "random" else curvature_label(m) for m in methods],
                  fontsize=7, rotation=20, ha="right")
    ax.set(ylabel=f"delta perplexity ({split})",
           title=f"{label}: retrained without the top {results['config']['percent']:g}% "
                 f"({results['n_removed']} sentences), {len(results['config']['seeds'])} seeds")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return save(fig, path)


def spectrum_scaling(rows: list[dict], label: str, path: str | os.PathLike) -> plt.Figure:
    """Log-log scaling with the width M of m = tr(C)/P, s = tr(C^2)/P and lambda_max (Karakida et al. 2019,
    Theorem 1: O(1/M), O(1) and O(M)), one line per curvature (colour) and state (solid trained, dashed init),
    its least-squares slope in log-log in the legend; the grey line is the theory's slope. Error bars: +-2 standard
    errors of the Hutchinson estimates; exact values where a row has them (:func:`~ifutils.curvature.estimators.preferred_estimates`).
    Non-positive values (an indefinite Hessian's mean) are left out.

    Args:
        rows: dicts with ``width``, ``state`` ("init"/"trained"), ``curvature`` and the statistics of
            :func:`ifutils.curvature.estimators.spectrum_stats`.
    """
    rows = [preferred_estimates(r) for r in rows]
    panels = [("mean", "m = tr(C) / P", -1), ("second_moment", "s = tr(C^2) / P", 0), ("lambda_max", "lambda_max", 1)]
    curvatures = sorted({r["curvature"] for r in rows}, key=["F", "H", "EF"].index)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, title, theory) in zip(axes, panels):
        for c, curv in enumerate(curvatures):
            for state, style in (("init", "--"), ("trained", "-")):
                pts = sorted((r["width"], r[key], r.get(f"{key}_se", 0.0)) for r in rows
                             if r["curvature"] == curv and r["state"] == state and r[key] > 0)
                if not pts:
                    continue
                w, y, se = map(np.array, zip(*pts))
                slope = f", slope {np.polyfit(np.log(w), np.log(y), 1)[0]:+.2f}" if len(pts) > 1 else ""
                ax.errorbar(w, y, yerr=2 * se, fmt="o" + style, color=f"C{c}", ms=4, capsize=3,
                            label=f"{curv} {state}{slope}")
        ref = [r[key] for r in rows if r[key] > 0]
        if ref:
            w = np.array(sorted({r["width"] for r in rows}), dtype=float)
            anchor = np.exp(np.mean(np.log(ref)))
            ax.plot(w, anchor * (w / w[0]) ** theory, color="0.6", lw=2, alpha=0.6, label=f"theory slope {theory:+d}")
        ax.set(xscale="log", yscale="log", xlabel="width M (hidden = embedding)", title=title)
        ax.set_xticks(sorted({r["width"] for r in rows}), [str(m) for m in sorted({r["width"] for r in rows})])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # only the widths as tick labels
        ax.legend(fontsize=6.5)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"{label}: whole-network curvature spectrum vs width (F = true Fisher = GGN, H = Hessian, "
                 f"EF = empirical Fisher)", fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def retraining_scatter(predicted: dict[str, torch.Tensor], actual: torch.Tensor, label: str,
                       path: str | os.PathLike) -> plt.Figure:
    """Predicted (first-order, -I_i / n) against actual leave-one-out change of each test loss, one panel per
    curvature, every (removal, test sentence) pair a point, with the line y = x. Units: nats per token."""
    fig, axes = plt.subplots(1, len(predicted), figsize=(3.4 * len(predicted), 3.4), squeeze=False)
    y = actual.double().flatten().cpu().numpy()
    for ax, (name, pred) in zip(axes[0], predicted.items()):
        x = pred.double().flatten().cpu().numpy()
        ax.scatter(x, y, s=3, alpha=0.4)
        lim = max(np.nanmax(abs(x)), np.nanmax(abs(y)))  # failed re-solves are NaN rows
        ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
        ax.set(xlabel="predicted change (nats/token)", title=curvature_label(name))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("actual change after re-solve")
    fig.suptitle(label, fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def sweep_with_ci(rows: list[dict], x: str, metric: str, label: str, path: str | os.PathLike,
                  xscale: str = "log", xlabel: str | None = None, categorical: bool = False) -> plt.Figure:
    """``metric`` against setting ``x`` for each curvature, with its 95 % bootstrap interval as a band.

    Args:
        rows: dicts with ``curvature`` (a key; the legend shows its label), ``x``'s key, ``metric`` and ``metric + "_ci"`` = (low, high).
        categorical: ``x`` values are labels (seeds, subsets), drawn at evenly spaced positions in row order.
    """
    fig, ax = plt.subplots(figsize=(8.5, 4.4))
    levels = list(dict.fromkeys(r[x] for r in rows))
    for k, name in enumerate(dict.fromkeys(r["curvature"] for r in rows)):
        mine = [r for r in rows if r["curvature"] == name]
        mine = mine if categorical else sorted(mine, key=lambda r: r[x])
        xs = [levels.index(r[x]) if categorical else r[x] for r in mine]
        color = plt.cm.tab20(k % 20)
        ax.plot(xs, [r[metric] for r in mine], marker="os^vD<>ph*"[k % 10], color=color, label=curvature_label(name),
                ms=4, lw=1)
        ax.fill_between(xs, [r[metric + "_ci"][0] for r in mine], [r[metric + "_ci"][1] for r in mine],
                        color=color, alpha=0.15)
    if categorical:
        ax.set_xticks(range(len(levels)), [str(v) for v in levels])
    else:
        ax.set_xscale(xscale)
    ax.set(xlabel=xlabel or x, ylabel=metric)
    ax.set_title(label, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return save(fig, path)


def whole_network_agreement(results: dict, label: str, path: str | os.PathLike) -> plt.Figure:
    """Whole network: Spearman (mean over test queries, 95 % bootstrap interval) of every curvature's influence with
    each exact matrix-free reference (one panel per reference, ``results["agreement_with_exact"]``), against the
    absolute damping of the approximation; the reference's own damping dotted."""
    refs = results.get("agreement_with_exact") or {}
    if not refs:
        raise ValueError("the results hold no exact-reference agreement (run with exact_curvatures)")
    fig, axes = plt.subplots(1, len(refs), figsize=(5.2 * len(refs), 3.6), squeeze=False)
    for ax, ref in zip(axes[0], refs.values()):
        for j, (key, row) in enumerate(ref["table"].items()):
            ds = sorted(float(d) for d in row["by_damping"])
            means = [row["by_damping"][repr(d)]["spearman"]["mean"] for d in ds]
            lows = [row["by_damping"][repr(d)]["spearman"]["ci"][0] for d in ds]
            highs = [row["by_damping"][repr(d)]["spearman"]["ci"][1] for d in ds]
            ax.plot(ds, means, "o-", color=f"C{j % 10}", label=curvature_label(key), ms=3)
            ax.fill_between(ds, lows, highs, color=f"C{j % 10}", alpha=0.15)
        ax.axvline(ref["damping"], color="k", ls=":", lw=1)
        ax.set(xscale="log", xlabel="damping lambda of the approximation", ylabel="Spearman with the reference",
               title=f"{label}: vs exact {curvature_label(ref['curvature'])} (lambda = {ref['damping']:g})")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save(fig, path)


def _lds_rows(results: dict) -> list[tuple[str, dict | None, dict | None]]:
    """(key, entry at the default damping or the damping-free entry, entry at the best damping) per method, by LDS."""
    table = results["lds"]
    keys = list(dict.fromkeys(r["key"] for r in table.values()))
    rows = []
    for key in keys:
        entries = [r for r in table.values() if r["key"] == key]
        free = [r for r in entries if r["damping"] is None]
        default = free[0] if free else next((r for r in entries if r["default"]), None)
        best = free[0] if free else max(entries, key=lambda r: r["lds"])
        rows.append((key, default, best))
    return sorted(rows, key=lambda r: r[2]["lds"])


def lds_by_method(results: dict, label: str, path: str | os.PathLike) -> plt.Figure:
    """Linear datamodeling score of every method (``results["lds"]`` of ``experiments/lds.py``): at its best damping
    (bar, 95 % bootstrap interval over queries) and at its default damping (open circle); the seed-to-seed
    agreement r (the LDS of one seed's losses predicting the other's) as a shaded band, and, when present, the
    ceiling of an LDS against the S-seed mean, sqrt(S r / (1 + (S - 1) r)) (``ceiling_mean_target``), as a dashed
    line."""
    rows = _lds_rows(results)
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(rows) + 1.4))
    y = np.arange(len(rows))
    best = [r[2] for r in rows]
    ax.barh(y, [b["lds"] for b in best], xerr=np.array([[b["lds"] - b["ci"][0], b["ci"][1] - b["lds"]] for b in best]).T,
            color="C0", alpha=0.7, capsize=2, label="best damping")
    for yi, (_, default, b) in zip(y, rows):
        if default is not None and default is not b:
            ax.plot(default["lds"], yi, "o", mfc="none", color="C3", ms=5)
    ax.plot([], [], "o", mfc="none", color="C3", label="default damping")
    ceiling = next(iter(results["lds"].values()))
    if ceiling.get("ceiling") is not None:
        ax.axvspan(*ceiling["ceiling_ci"], color="0.6", alpha=0.35,
                   label=f"seed-to-seed agreement {ceiling['ceiling']:.2f}")
    if ceiling.get("ceiling_mean_target") is not None:
        ax.axvline(ceiling["ceiling_mean_target"], color="0.3", ls="--", lw=1,
                   label=f"ceiling for the seed mean {ceiling['ceiling_mean_target']:.2f}")
    ax.set_yticks(y, [curvature_label(k) + ("" if b["damping"] is None else f"  (lambda {b['damping']:.0e})")
                      for k, _, b in rows], fontsize=7)
    ax.axvline(0, color="k", lw=0.8)
    ax.set(xlabel=f"LDS (Spearman over {best[0]['subsets']} subsets, mean over {best[0]['queries']} queries)")
    ax.set_title(label, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return save(fig, path)


def lds_vs_damping(results: dict, label: str, path: str | os.PathLike) -> plt.Figure:
    """LDS against the absolute damping for every damped method (95 % intervals shaded); damping-free methods as
    horizontal lines; each method's default damping marked by a larger dot; the seed-to-seed agreement as a grey
    band and the ceiling for the seed mean as a dashed grey line."""
    table = results["lds"]
    keys = list(dict.fromkeys(r["key"] for r in table.values()))
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    for j, key in enumerate(keys):
        entries = sorted((r for r in table.values() if r["key"] == key), key=lambda r: r["damping"] or 0)
        color = f"C{j % 10}"
        if entries[0]["damping"] is None:
            ax.axhline(entries[0]["lds"], color=color, ls="--", lw=1, label=curvature_label(key))
            continue
        ds = [r["damping"] for r in entries]
        ax.plot(ds, [r["lds"] for r in entries], marker="o" if j < 10 else "s", ms=3, color=color,
                label=curvature_label(key), ls="-" if j < 10 else "-.")  # past 10 methods the colours repeat
        ax.fill_between(ds, [r["ci"][0] for r in entries], [r["ci"][1] for r in entries], color=color, alpha=0.1)
        for r in entries:
            if r["default"]:
                ax.plot(r["damping"], r["lds"], "o", ms=7, color=color)
    first = next(iter(table.values()))
    if first.get("ceiling") is not None:
        ax.axhspan(*first["ceiling_ci"], color="0.6", alpha=0.3)
    if first.get("ceiling_mean_target") is not None:
        ax.axhline(first["ceiling_mean_target"], color="0.3", ls="--", lw=1)
    ax.set(xscale="log", xlabel="absolute damping lambda", ylabel="LDS")
    ax.set_title(label, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return save(fig, path)


def detection_bars(table: dict, label: str, path: str | os.PathLike, metric: str = "auroc") -> plt.Figure:
    """Corrupted-sentence detection (``experiments/detection.py``): ``metric`` (mean +- std over seeds) of every
    ranking, one panel per corruption kind; chance (AUROC 0.5, or the corrupted fraction for average precision)
    dotted."""
    kinds = list(table)
    if not kinds:
        raise ValueError("the detection table is empty: no corrupted model was scored")
    names = list(table[kinds[0]]["rankings"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 0.28 * len(names) + 1.6), squeeze=False,
                             sharey=True)
    y = np.arange(len(names))
    for ax, kind in zip(axes[0], kinds):
        entries = [table[kind]["rankings"][n][metric] for n in names]
        colors = ["C0" if n.startswith("self:") else "C1" if n.startswith("valid:") else "C2" for n in names]
        ax.barh(y, [e["mean"] for e in entries], xerr=[e["std"] for e in entries], color=colors, alpha=0.8, capsize=2)
        if metric == "auroc":
            ax.axvline(0.5, color="k", ls=":", lw=1)
        ax.set(title=f"{kind} ({table[kind]['seeds']} seeds)", xlabel=metric.replace("_", " "))
        ax.grid(alpha=0.3, axis="x")
    shown = [(f"self-infl. {curvature_label(n[5:])}" if n.startswith("self:") else
              f"valid-infl. {curvature_label(n[6:])}" if n.startswith("valid:") else n) for n in names]
    axes[0][0].set_yticks(y, shown, fontsize=7)
    fig.suptitle(label, fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def perplexity_by_level(rows: list[dict], xlabel: str, label: str, path: str | os.PathLike,
                        baseline: dict | None = None) -> plt.Figure:
    """Validation perplexity (mean +- std over seeds) against the level (percent trimmed or kept, buffer size) for
    each method of :func:`ifutils.experiments.applications.perplexity_table`; ``baseline`` (a row, e.g. nothing
    trimmed) as a horizontal band."""
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["level"] not in (None, 0)))
    for j, m in enumerate(methods):
        got = sorted((r for r in rows if r["method"] == m and r["level"] not in (None, 0)), key=lambda r: r["level"])
        ax.errorbar([r["level"] for r in got], [r["valid_ppl"]["mean"] for r in got],
                    yerr=[r["valid_ppl"]["std"] for r in got], fmt="o-" if m != "random" else "s--", ms=4, capsize=2,
                    color="k" if m == "random" else f"C{j % 10}", label=m)
    if baseline is not None:
        v = baseline["valid_ppl"]
        ax.axhspan(v["mean"] - v["std"], v["mean"] + v["std"], color="0.6", alpha=0.3, label=baseline["method"])
        ax.axhline(v["mean"], color="0.4", lw=1)
    ax.set(xlabel=xlabel, ylabel="validation perplexity")
    ax.set_title(label, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)


def unlearning_bars(table: dict, label: str, path: str | os.PathLike) -> plt.Figure:
    """Unlearning: loss on the forgotten sentences and the membership gap (forgotten - test) of the original model
    and every Newton step, beside the retrained models' mean +- std (band)."""
    rows = table["rows"]
    names = [r["method"] if r["damping"] is None else f"{curvature_label(r['method'])} @ {r['damping']:.0e}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.25 * len(rows) + 1.6), sharey=True)
    y = np.arange(len(rows))
    summary = table.get("retrained_summary") or {}
    for ax, key, title in ((axes[0], "forget_loss", "loss on forgotten sentences (nats/token)"),
                           (axes[1], "mia_gap", "membership gap: forgotten - test (nats/token)")):
        values = np.array([r[key] for r in rows])
        ax.barh(y, values, color="C0", alpha=0.8)
        if key in summary:
            m, s = summary[key]["mean"], summary[key]["std"]
            ax.axvspan(m - s, m + s, color="C3", alpha=0.25, label="retrained without them")
            ax.axvline(m, color="C3", lw=1)
        lo, hi = np.percentile(values, [5, 95]) if len(values) > 3 else (values.min(), values.max())
        pad = 0.5 * (hi - lo + 1e-9)
        ax.set_xlim(min(lo, summary.get(key, {}).get("mean", lo)) - pad, max(hi, summary.get(key, {}).get("mean", hi)) + pad)
        ax.set(title=title)
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(y, names, fontsize=7)
    axes[1].legend(fontsize=7)
    fig.suptitle(label, fontsize=9)
    fig.tight_layout()
    return save(fig, path)
