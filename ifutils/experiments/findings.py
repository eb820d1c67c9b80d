"""Plain-text tables of the study's results files, for the notebook's Findings section and the README.

Each function reads one results section as written by the code that produced it (``results/<tag>.json``
``ground_truth``, ``results/robustness.json``, ``results/retrain_check.json``, ``results/spectrum.json``) and returns
a table; :func:`findings` joins the tables of the files that exist, so the section runs at any stage of the study.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..curvature.labels import label as curvature_label
from .comparison import REFERENCE
from .spectrum import preferred_estimates


def _ci(metric: dict, key: str) -> str:
    low, high = metric[f"{key}_ci"]
    return f"{metric[key]:6.3f} [{low:6.3f}, {high:6.3f}]"


def ground_truth_table(gt: dict) -> str:
    """Every curvature's agreement with the subset re-solves: leave-one-out Pearson and Spearman, leave-k-out
    Pearson and LDS, each with its bootstrap 95 % interval; then the noise floor and the finite-difference check."""
    c = gt["config"]
    lines = [f"re-solves: n={c['n']}, lambda={c['damping']:g}, {c['n_loo']} leave-one-out, {c['n_groups']} groups of "
             f"{c['group_size']}, LDS M={c['lds_subsets']} beta={c['lds_fraction']}; tol {c['tol']:g}",
             f"{'curvature':40s} {'LOO Pearson':>24s} {'LOO Spearman':>24s} {'leave-k Pearson':>24s} {'LDS':>24s}"]
    for name, m in gt["agreement"].items():
        if "error" in m:
            lines.append(f"{curvature_label(name):40s} {m['error'][:80]}")
            continue
        lines.append(f"{curvature_label(name):40s} {_ci(m['leave-one-out'], 'pearson')} {_ci(m['leave-one-out'], 'spearman')} "
                     f"{_ci(m['leave-k-out'], 'pearson')} {_ci(m['LDS'], 'spearman')}")
    floor = gt["noise_floor"]
    lines.append(f"noise floor: {floor['max_abs']:.1e} nats/token against a median |LOO change| of "
                 f"{floor['median_abs_loo']:.1e} ({100 * floor['fraction_loo_below_floor']:.0f}% of LOO changes below "
                 f"it); LDS: floor {floor['lds_floor']:.1e} against a median |change| of {floor['median_abs_lds']:.1e}")
    for eps in dict.fromkeys(r["eps"] for r in gt["finite_differences"]):
        errors = [r["relative_error"] for r in gt["finite_differences"] if r["eps"] == eps]
        lines.append(f"up-weighting, eps={eps}: relative error of the finite difference against exact-Hessian "
                     f"influence {min(errors):.1e} to {max(errors):.1e} over {len(errors)} samples")
    return "\n".join(lines)


def robustness_table(robustness: dict, curvatures: tuple[str, ...]) -> str:
    """Spearman with exact-Hessian influence [95 % CI] of ``curvatures`` (keys) at every setting of every sweep, each
    shown by its label."""
    lines = []
    for sweep, section in robustness.items():
        groups = ({k: section[k] for k in ("sentences", "mc_draws", "damping") if k in section} if sweep == "estimation"
                  else {sweep: [r for p in section["points"].values() for r in p["rows"]]})
        for name, rows in groups.items():
            field = next(k for k in rows[0] if k not in _ROW_KEYS) if rows else None
            lines.append(f"-- {name} (by {field})")
            for r in rows:
                if r["curvature"] in curvatures or name == "mc_draws":
                    flag = "  (reference indefinite)" if r["reference_indefinite"] else ""
                    lines.append(f"{str(r[field]):>10s}  {curvature_label(r['curvature']):40s} {_ci(r, 'spearman')}{flag}")
        for label, point in section.get("points", {}).items():  # best damping against the spectrum's scale
            h = point["spectra"][REFERENCE]
            best = ", ".join(f"{curvature_label(n)} {d:.0e}" for n, d in point["best_damping"].items() if n in curvatures)
            lines.append(f"{label:>10s}  lambda used {point['damping']:.1e}; H: mean eigenvalue {h['mean']:.1e}, "
                         f"largest {h['max']:.1e}, smallest {h['min']:.1e}; best damping: {best}")
    return "\n".join(lines)


_ROW_KEYS = {"curvature", "damping", "reference_indefinite", "pearson", "pearson_ci", "spearman", "spearman_ci", "columns"}


def retrain_table(retrain: dict) -> str:
    """Change of validation perplexity after removing each method's top-k% and retraining: mean +- seed std."""
    floor = retrain["noise_floor"]["valid"]
    lines = [f"removed {retrain['n_removed']} sentences; full-data validation perplexity "
             f"{retrain['full']['valid']['mean']:.2f} +- {floor:.2f} (seed-to-seed std, the noise floor)"]
    random = retrain["methods"].get("random", {}).get("valid", {}).get("per_seed", {})
    for method, entry in retrain["methods"].items():
        v = entry["valid"]
        line = (f"{method if method == 'random' else curvature_label(method):32s} delta ppl {v['mean']:+7.3f} +- {v['std']:.3f}  per seed "
                + ", ".join(f"{x:+.3f}" for x in v["per_seed"].values()))
        paired = [v["per_seed"][s] - random[s] for s in v["per_seed"] if s in random]
        if method != "random" and len(paired) > 1:  # same seed, same removal count: the paired control
            line += f"; minus random, paired by seed: {np.mean(paired):+.3f} +- {np.std(paired, ddof=1):.3f}"
        lines.append(line)
    return "\n".join(lines)


def spectrum_table(spectrum: dict) -> str:
    """m, s and lambda_max per width, state and curvature (exact ones where the file has them:
    :func:`~ifutils.curvature.estimators.preferred_estimates`), and the fitted log-log slope in width of each."""
    entries = [preferred_estimates(e) for e in spectrum["entries"].values()]
    lines = [f"{'width':>5s} {'state':8s} {'C':3s} {'mean m':>10s} {'s':>10s} {'lambda_max':>10s}"]
    for e in sorted(entries, key=lambda e: (e["state"], e["curvature"], e["width"])):
        lines.append(f"{e['width']:5d} {e['state']:8s} {e['curvature']:3s} {e['mean']:10.3e} {e['second_moment']:10.3e} "
                     f"{e['lambda_max']:10.3e}")
    for state in ("init", "trained"):
        for curvature in ("F", "H", "EF"):
            mine = sorted((e for e in entries if e["state"] == state and e["curvature"] == curvature),
                          key=lambda e: e["width"])
            if len(mine) >= 2:
                slope = {k: np.polyfit(np.log([e["width"] for e in mine]), np.log(np.abs([e[k] for e in mine])), 1)[0]
                         for k in ("mean", "second_moment", "lambda_max")}
                lines.append(f"slopes in width, {state} {curvature}: m {slope['mean']:+.2f} (theory -1), s "
                             f"{slope['second_moment']:+.2f} (0), lambda_max {slope['lambda_max']:+.2f} (+1)")
    return "\n".join(lines)


def findings(results_dir: str | os.PathLike, tag: str, curvatures: tuple[str, ...]) -> str:
    """The tables of every results file present under ``results_dir``: ``<tag>.json``'s ground truth, the
    robustness sweeps, the full-model retraining check and the spectrum statistics."""
    root = Path(results_dir)
    read = lambda name: json.loads((root / name).read_text()) if (root / name).is_file() else None  # noqa: E731
    parts = []
    if (main := read(f"{tag}.json")) and "ground_truth" in main:
        parts.append("Ground truth by retraining the subset\n" + ground_truth_table(main["ground_truth"]))
    if robustness := read("robustness.json"):
        parts.append("Robustness sweeps (Spearman with exact-Hessian influence)\n" + robustness_table(robustness, curvatures))
    if (retrain := read("retrain_check.json")) and retrain.get("methods"):
        parts.append("Full-model retraining check\n" + retrain_table(retrain))
    if (spectrum := read("spectrum.json")) and spectrum.get("entries"):
        parts.append("Spectrum statistics (whole network)\n" + spectrum_table(spectrum))
    return "\n\n".join(parts) or f"no results under {root} yet"
