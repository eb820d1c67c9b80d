"""Figures, each written atomically as PNG and returned as a matplotlib Figure for notebooks."""

from __future__ import annotations

import os

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import torch

from .io import atomic_write


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
    """One panel per curvature: its influence scores against the reference (exact Hessian), all
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
        ax.set(title=name, xlabel="exact-Hessian influence / std", ylabel="influence / std")
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
    names = list(dict.fromkeys(r["curvature"] for r in rows if r["curvature"] != "Hessian"))
    style = {n: (plt.cm.tab20(k % 20), "os^vD<>ph*"[k % 10]) for k, n in enumerate(names)}
    for ax, mode in zip(axes, ["absolute", "relative"]):
        sel = [r for r in rows if r["mode"] in ((mode, "none") if mode == "absolute" else (mode,))
               and r["curvature"] != "Hessian"]
        indefinite = [r["value"] for r in sel if r["reference_indefinite"]]
        if indefinite:
            ax.axvspan(min(indefinite), max(indefinite), color="0.85", label="H + lambda I indefinite")
        for name in dict.fromkeys(r["curvature"] for r in sel):
            pts = [(r["value"], r[metric]) for r in sel if r["curvature"] == name]
            color, marker = style[name]
            dashed = any(r["mode"] == "none" for r in sel if r["curvature"] == name)
            ax.plot(*zip(*pts), marker=marker, ls="--" if dashed else "-", color=color, label=name, ms=4, lw=1)
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
    """Sorted eigenvalue magnitudes on a log axis; negative eigenvalues are drawn as crosses,
    never dropped."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for k, (name, ev) in enumerate(eigenvalues.items()):
        ev = ev.double().cpu().numpy()[::-1]
        rank = np.arange(1, len(ev) + 1)
        pos = ev > 0
        ax.plot(rank[pos], ev[pos], ".", ms=3, color=f"C{k}", label=f"{name} ({(~pos).sum()} of {len(ev)} <= 0)")
        if (~pos).any():
            ax.plot(rank[~pos], np.abs(ev[~pos]) + 1e-300, "x", ms=3, color=f"C{k}")
    ax.set_yscale("log")
    ax.set(xlabel="eigenvalue rank", ylabel="|eigenvalue|", title=f"{label}: spectra (x = negative)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save(fig, path)
