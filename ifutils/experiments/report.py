"""docs/results.md, generated: every ``results/*.json`` present rendered as markdown tables.

:func:`results_markdown` reads each results file under a directory and renders what it holds, section by section
(training perplexities; the influence comparison, its damping sweep, the subset spectrum, the matrix distances,
the Monte Carlo Fisher error and the Hessian-free detection scores; the retraining ground truth; the robustness
sweeps; the full-model retraining check; the whole-network spectrum statistics). Each section names the file and
the key it comes from. The output depends only on the files' contents (files in sorted order, keys in file
order, fixed number formats), so ``tests/test_docs.py`` can check that the committed docs/results.md is current.

Curvatures are shown through :func:`display`, which turns a short key (``"ggn"``) into its label and leaves a
label (results files written before the keys) unchanged, so both kinds of file render the same.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from ..curvature.labels import label
from ..io import atomic_write
from .spectrum import preferred_estimates

REGENERATE = "python experiments/report.py"
"""The command that rewrites docs/results.md."""

HEADER = (f"# Measured results\n\nGenerated from `results/*.json` by `{REGENERATE}` "
          "(`ifutils.experiments.report`); do not edit by hand. Each section names the file and key it comes from; "
          "the prose that interprets these numbers is in the README, docs/ and experiments/README.md. "
          "Correlations are means over test sentences; intervals are percentile-bootstrap 95 %.\n")

SPECTRUM_NAMES = {"F": "true Fisher F (= GGN)", "H": "Hessian H", "EF": "sentence EF"}


def display(name: str) -> str:
    """The display label of a curvature: ``label(name)`` when ``name`` is a known key (``"ggn"``), else ``name``
    unchanged (a label such as ``"GGN (true Fisher, closed form)"``, or a method such as ``"random"``)."""
    try:
        return label(name)
    except (KeyError, TypeError):
        return str(name)


def _lookup(mapping: dict, name: str):
    """``mapping[name]``, else ``mapping[label(name)]`` (a key asked of a file that stores labels); None if neither."""
    if name in mapping:
        return mapping[name]
    shown = display(name)
    if shown in mapping:
        return mapping[shown]
    for k, v in mapping.items():  # a label asked of a file that stores keys
        if display(k) == name:
            return v
    return None


def _cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> str:
    """A markdown table; cells are converted with ``str`` and their pipes escaped."""
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _f(x, digits: int = 3) -> str:
    """Fixed-point number; '' for None, 'nan' for NaN."""
    if x is None:
        return ""
    x = float(x)
    return "nan" if math.isnan(x) else f"{x:.{digits}f}"


def _e(x, digits: int = 1) -> str:
    """Scientific number; '' for None."""
    if x is None:
        return ""
    x = float(x)
    return "nan" if math.isnan(x) else f"{x:.{digits}e}"


def _ci(metric: dict | None, key: str) -> str:
    """``metric[key]`` with its interval ``metric[key + "_ci"]``: ``0.999 [0.998, 1.000]``."""
    if not metric or key not in metric:
        return ""
    low, high = metric.get(f"{key}_ci", (None, None))
    return f"{_f(metric[key])} [{_f(low)}, {_f(high)}]" if low is not None else _f(metric[key])


def _damping(mode: str, value) -> str:
    return {"absolute": f"λ={value:g}", "relative": f"α={value:g}"}.get(mode, "-")


# ---------------------------------------------------------------- training


def training_markdown(files: dict[str, dict]) -> str:
    """One row per results file with a ``training`` section: dataset, perplexities, epochs, seconds."""
    rows = []
    for name, data in files.items():
        t = data.get("training")
        if not t:
            continue
        seconds = t.get("seconds", {})
        total = next((v for k, v in seconds.items() if k.startswith("training")), None)
        rows.append([f"`{name}`", t.get("data_label", t.get("dataset", "")), _f(t.get("valid_ppl"), 1),
                     _f(t.get("test_ppl"), 1), len(t.get("history", [])), _f(total, 0)])
    if not rows:
        return ""
    return ("## Training\n\nFrom `training` (perplexity = exp of the mean token NLL in nats; training seconds of "
            "all epochs).\n\n" + _table(["file", "data", "validation perplexity", "test perplexity", "epochs",
                                        "training s"], rows))


# ---------------------------------------------------------------- influence comparison


def comparison_markdown(table: list[dict]) -> str:
    """Markdown version of :func:`ifutils.experiments.comparison.format_comparison`: each curvature at the default
    damping and at its best damping (tuned against the exact answer), build seconds (``*``: a pass shared with other
    rows) and the bytes it holds."""
    frac = lambda m: (m["top_frac_harmful"] + m["top_frac_helpful"]) / 2 if m else None
    rows = []
    for e in table:
        b, d = e["best"], e.get("default") or {}
        secs = "" if e.get("build_seconds") is None else f"{e['build_seconds']:.1f}" + ("*" if e.get("shared_with") else "")
        mem = "" if e.get("bytes") is None else (f"{e['bytes'] / 2**20:.2f} MiB" if e["bytes"] >= 2**20
                                                 else f"{e['bytes'] / 2**10:.1f} KiB")
        rows.append([display(e["curvature"]), _f(d.get("pearson")), _f(d.get("spearman")), _f(frac(d)),
                     f"{_f(b['spearman'])} ({_damping(b['mode'], b['value'])})", _f(frac(b)), secs, mem])
    return _table(["curvature", "Pearson", "Spearman", "top-10%", "best Spearman (damping)", "top-10% at best",
                   "build s", "memory"], rows)


def damping_sweep_markdown(agreement: list[dict]) -> str:
    """Spearman of each curvature against the reference damped alike, one column per damping (``†``: the
    reference H + lambda I is indefinite there). Damping-free scores fill the absolute columns."""
    columns: dict[tuple, bool] = {}
    cells: dict[str, dict[tuple, float]] = {}
    for r in agreement:
        col = ("absolute" if r["mode"] == "none" else r["mode"], r["value"])
        if r["mode"] != "none":
            columns[col] = columns.get(col, False) or bool(r.get("reference_indefinite"))
        cells.setdefault(display(r["curvature"]), {})[col] = r["spearman"]
    order = sorted(columns, key=lambda c: (c[0] != "absolute", c[1]))
    header = ["curvature"] + [_damping(*c) + (" †" if columns[c] else "") for c in order]
    rows = [[name] + [_f(v.get(c)) for c in order] for name, v in cells.items()]
    return _table(header, rows)


def subset_spectrum_markdown(spectra: dict) -> str:
    """Eigenvalue statistics of each curvature on the subset: mean, largest, smallest, negative count and mass."""
    rows = [[display(n), _e(s.get("mean")), _e(s.get("max")), _e(s.get("min")), s.get("num_negative", ""),
             _f(s.get("negative_mass"))] for n, s in spectra.items()]
    return _table(["curvature", "mean eigenvalue tr/p", "largest", "smallest", "negative eigenvalues",
                   "negative mass sum abs(neg) / sum abs(all)"], rows)


def influence_markdown(name: str, inf: dict) -> str:
    """The ``influence`` section of one results file: setting, comparison, damping sweep, subset spectrum, matrix
    distances, Monte Carlo Fisher error, Hessian-free detection."""
    c = inf.get("config", {})
    parts = [f"### `{name}`: {inf.get('data_label', inf.get('dataset', ''))}, subset {c.get('subset', '')}",
             (f"p = {inf.get('p')}, n_H = {inf.get('n_hessian')}, n_train = {inf.get('n_train')}, "
             f"n_test = {inf.get('n_test')}, k = {c.get('mc_samples')} Monte Carlo draws, default damping "
             f"{c.get('default_damping')}, dtype {c.get('dtype')}; git commit "
             f"`{inf.get('environment', {}).get('git_commit', '')[:7]}`.")]
    if inf.get("comparison"):
        parts.append(f"Every curvature against H + {c.get('default_damping')} I (`influence.comparison`; top-10% = mean "
                     "of the harmful and helpful top-10% overlaps, chance 0.10; best = damping tuned against the exact "
                     "answer, an upper bound):\n\n" + comparison_markdown(inf["comparison"]))
    if inf.get("agreement"):
        parts.append("Spearman with exact-Hessian influence, the reference damped like the curvature "
                     "(`influence.agreement`; † = H + lambda I indefinite):\n\n" + damping_sweep_markdown(inf["agreement"]))
    if inf.get("spectra"):
        parts.append("Spectrum on the subset (`influence.spectra`):\n\n" + subset_spectrum_markdown(inf["spectra"]))
    if inf.get("matrix_errors"):
        refs = list(dict.fromkeys(r for v in inf["matrix_errors"].values() for r in v))
        rows = [[display(n)] + [_f(_lookup(v, r), 2) for r in refs] for n, v in inf["matrix_errors"].items()]
        parts.append("Relative Frobenius distance of each matrix (`influence.matrix_errors`):\n\n"
                     + _table(["curvature"] + [f"to {display(r)}" for r in refs], rows))
    if inf.get("mc_fisher_error"):
        parts.append("Monte Carlo true Fisher against its closed form, relative Frobenius error by label draws k "
                     "(`influence.mc_fisher_error`):\n\n"
                     + _table(["k"] + list(inf["mc_fisher_error"]), [["error"] + [_f(v) for v in inf["mc_fisher_error"].values()]]))
    if inf.get("detection"):
        rows = [[n, _f(v.get("spearman_self_influence")), _f(v.get("spearman_test_influence"))]
                for n, v in inf["detection"].items()]
        parts.append("Hessian-free detection scores (`influence.detection`), Spearman with exact-Hessian influence:\n\n"
                     + _table(["score", "self-influence", "influence on the mean test loss"], rows))
    return "\n\n".join(parts)


# ---------------------------------------------------------------- ground truth


def ground_truth_markdown(name: str, gt: dict) -> str:
    """The ``ground_truth`` section of one results file: setting, solves, noise floor, finite differences, every
    curvature's agreement with the re-solves (with intervals) and the leave-one-out Spearman against damping."""
    c = gt["config"]
    ref, h = gt.get("reference_solve", {}), gt.get("hessian_at_theta_star", {})
    parts = [f"### `{name}`: lambda = {c['damping']:g}, n = {c['n']}",
             (f"{c['n_loo']} leave-one-out, {c['n_groups']} groups of {c['group_size']}, LDS M = {c['lds_subsets']} "
             f"beta = {c['lds_fraction']}; tolerance {c['tol']:g} (LDS {c.get('lds_tol', c['tol']):g}); {c['bootstrap']} "
             f"bootstrap resamples over removals. theta*_S: {ref.get('iterations')} Newton steps, "
             f"{ref.get('hessian_evaluations')} exact Hessians, ||grad J|| = {_e(ref.get('grad_norm'))}, "
             f"||theta*_S - theta_hat|| = {_f(ref.get('distance_from_trained'), 2)}. Hessian at theta*_S: eigenvalues "
             f"{_e(h.get('min_eigenvalue'))} to {_e(h.get('max_eigenvalue'))}; per-sentence Hessians sum to it to "
             f"{_e(h.get('sample_hessians_mean_error'))}.")]
    solves = gt.get("solves", {})
    if solves:
        rows = [[k, s.get("solved"), s.get("failed"), _f(s.get("iterations_mean"), 2), s.get("iterations_max"),
                 s.get("hessians_max"), _e(s.get("grad_norm_max"))] for k, s in solves.items()]
        parts.append("Re-solves (`ground_truth.solves`):\n\n" + _table(
            ["removal", "solved", "failed", "Newton steps, mean", "max", "Hessians re-formed, max", "max ||grad J||"], rows))
    floor = gt.get("noise_floor")
    if floor:
        parts.append(f"Noise floor (`ground_truth.noise_floor`): {_e(floor['max_abs'])} nats/token against a median "
                     f"|leave-one-out change| of {_e(floor['median_abs_loo'])} ({_f(100 * floor['fraction_loo_below_floor'], 0)} % "
                     f"below it); LDS floor {_e(floor['lds_floor'])} against a median |change| of {_e(floor['median_abs_lds'])}.")
    fd = gt.get("finite_differences", [])
    if fd:
        rows = []
        for eps in dict.fromkeys(r["eps"] for r in fd):
            errors = [r["relative_error"] for r in fd if r["eps"] == eps]
            rows.append([eps, len(errors), _e(min(errors)), _e(max(errors))])
        parts.append("Up-weighting central finite differences against exact-Hessian influence I_i / n "
                     "(`ground_truth.finite_differences`):\n\n" + _table(["eps", "samples", "relative error, min", "max"], rows))
    rows = []
    for n, m in gt.get("agreement", {}).items():
        if "error" in m:
            rows.append([display(n), m["error"][:80], "", "", ""])
            continue
        rows.append([display(n), _ci(m.get("leave-one-out"), "pearson"), _ci(m.get("leave-one-out"), "spearman"),
                     _ci(m.get("leave-k-out"), "pearson"), _ci(m.get("LDS"), "spearman")])
    parts.append(f"Agreement with the re-solves, curvatures damped by lambda = {c['damping']:g} (`ground_truth.agreement`):\n\n"
                 + _table(["curvature", "LOO Pearson [95% CI]", "LOO Spearman", f"leave-{c['group_size']}-out Pearson",
                           f"LDS (M = {c['lds_subsets']})"], rows))
    sweep = gt.get("damping_sweep", [])
    if sweep:
        dampings = sorted({r["damping"] for r in sweep})
        cells: dict[str, dict] = {}
        for r in sweep:
            cells.setdefault(display(r["curvature"]), {})[r["damping"]] = r["loo_spearman"]
        parts.append("Leave-one-out Spearman against the curvature's damping, re-solves fixed (`ground_truth.damping_sweep`):\n\n"
                     + _table(["curvature"] + [f"λ={d:g}" for d in dampings],
                              [[n] + [_f(v.get(d)) for d in dampings] for n, v in cells.items()]))
    return "\n\n".join(parts)


# ---------------------------------------------------------------- robustness

_ROW_FIELDS = {"curvature", "damping", "reference_indefinite", "pearson", "pearson_ci", "spearman", "spearman_ci",
               "columns"}


def _pivot(rows: list[dict], field: str) -> str:
    """Curvature x ``field`` table of Spearman [95 % CI] (``†``: reference indefinite)."""
    values = list(dict.fromkeys(r[field] for r in rows))
    cells: dict[str, dict] = {}
    for r in rows:
        cells.setdefault(display(r["curvature"]), {})[r[field]] = _ci(r, "spearman") + (" †" if r.get("reference_indefinite") else "")
    return _table(["curvature"] + [f"{field} = {v:g}" if isinstance(v, float) else f"{field} = {v}" for v in values],
                  [[n] + [v.get(x, "") for x in values] for n, v in cells.items()])


def robustness_markdown(robustness: dict) -> str:
    """``results/robustness.json``: the estimation sweeps (sentences, MC draws, damping) as curvature x setting
    tables, and each model/subset sweep as setting x curvature with its damping, H spectrum and best damping."""
    parts = [("## Robustness sweeps\n\nFrom `results/robustness.json`: Spearman with exact-Hessian influence "
             "[95 % CI over test sentences]; † = reference H + lambda I indefinite.")]
    for sweep, section in robustness.items():
        c = section.get("config", {})
        setting = ("" if sweep == "subsets" else f"subset {c.get('subset')}, ") + (
                   f"p = {c.get('num_coords')}, n_H = {c.get('n_hessian')}, "
                   f"{c.get('n_train')} scored and {c.get('n_test')} test sentences")
        if "points" not in section:
            for key in ("sentences", "mc_draws", "damping"):
                rows = section.get(key)
                if rows:
                    field = next(k for k in rows[0] if k not in _ROW_FIELDS)
                    parts.append(f"### `{sweep}.{key}`\n\n{setting}; lambda = {c.get('default_damping')} unless swept.\n\n"
                                 + _pivot(rows, field))
            continue
        points = section["points"]
        curvatures = list(dict.fromkeys(display(r["curvature"]) for p in points.values() for r in p["rows"]))
        rows, best_rows = [], []
        for setting_name, p in points.items():
            h = _lookup(p.get("spectra", {}), "hessian") or {}
            by = {display(r["curvature"]): _ci(r, "spearman") + (" †" if r.get("reference_indefinite") else "")
                  for r in p["rows"]}
            rows.append([setting_name, _e(p.get("damping")),
                         f"{_e(h.get('min'))} / {_e(h.get('mean'))} / {_e(h.get('max'))}"] + [by.get(n, "n/a") for n in curvatures])
            best = {display(n): d for n, d in p.get("best_damping", {}).items()}
            best_rows.append([setting_name] + [_e(best[n], 0) if n in best else "" for n in curvatures])
        parts.append(f"### `{sweep}`\n\n{setting}; lambda = scale_damping per setting.\n\n"
                     + _table([sweep, "lambda", "H eigenvalues: min / mean / max"] + curvatures, rows)
                     + f"\n\nBest damping on the grid (`{sweep}.points.*.best_damping`):\n\n"
                     + _table([sweep] + curvatures, best_rows))
    return "\n\n".join(parts)


# ---------------------------------------------------------------- retraining check and spectrum


def retrain_markdown(retrain: dict) -> str:
    """``results/retrain_check.json``: change of validation perplexity after removing each method's top-k% and
    retraining, mean +- seed std, per seed, and minus the random removal paired by seed (mean +- std, ddof 1)."""
    floor = retrain["noise_floor"]["valid"]
    random = retrain["methods"].get("random", {}).get("valid", {}).get("per_seed", {})
    rows = []
    for method, entry in retrain["methods"].items():
        v = entry["valid"]
        paired = [v["per_seed"][s] - random[s] for s in v["per_seed"] if s in random]
        rel = (f"{np.mean(paired):+.1f} +- {np.std(paired, ddof=1):.1f}" if method != "random" and len(paired) > 1 else "")
        rows.append([display(method), f"{v['mean']:+.1f} +- {v['std']:.1f}",
                     ", ".join(f"{x:+.1f}" for x in v["per_seed"].values()), rel])
    seeds = ", ".join(str(s) for s in retrain.get("config", {}).get("seeds", []))
    return ("## Full-model retraining check\n\nFrom `results/retrain_check.json` (`methods`, `full`, `noise_floor`): "
            f"{retrain['n_removed']} sentences removed, damping {_e(retrain.get('damping'))}; full-data validation "
            f"perplexity {retrain['full']['valid']['mean']:.1f} +- {floor:.1f} (seed-to-seed std, the noise floor).\n\n"
            + _table(["removed by", "delta validation perplexity, mean +- std", f"per seed ({seeds})",
                      "minus random, paired by seed"], rows))


def _slope(entries: list[dict], key: str) -> float:
    return float(np.polyfit(np.log([e["width"] for e in entries]), np.log(np.abs([e[key] for e in entries])), 1)[0])


def spectrum_markdown(spectrum: dict) -> str:
    """``results/spectrum.json``: m = tr(C)/P, s = tr(C^2)/P, lambda_max and k_eff = P m^2 / s per width, for each
    curvature and state (exact EF values where present, :func:`preferred_estimates`), and the least-squares
    slopes of log statistic on log width."""
    entries = [preferred_estimates(e) for e in spectrum["entries"].values()]
    rows = []
    for state in dict.fromkeys(e["state"] for e in entries):
        for curv in dict.fromkeys(e["curvature"] for e in entries):
            mine = sorted((e for e in entries if e["state"] == state and e["curvature"] == curv), key=lambda e: e["width"])
            if not mine:
                continue
            join = lambda f, mine=mine: " / ".join(f(e) for e in mine)
            keff = "" if curv == "H" else join(lambda e: f"{e['P'] * e['mean'] ** 2 / e['second_moment']:,.0f}")
            slopes = (", ".join(f"{_slope(mine, k):+.2f}" for k in ("mean", "second_moment", "lambda_max"))
                      if len(mine) >= 2 else "")
            rows.append([SPECTRUM_NAMES.get(curv, curv), state, join(lambda e: _e(e["mean"])),
                         join(lambda e: _e(e["second_moment"])), join(lambda e: f"{e['lambda_max']:.3g}"), keff, slopes])
    widths = " / ".join(str(w) for w in sorted({e["width"] for e in entries}))
    s = spectrum.get("settings", {})
    return ("## Spectrum statistics (whole network)\n\nFrom `results/spectrum.json` (`entries`): n = "
            f"{s.get('n')} sentences, {s.get('probes')} Rademacher probes, Lanczos at most {s.get('max_matvecs')} products; "
            "sentence-EF values exact from its n x n Gram matrix.\n\n"
            + _table(["C", "state", f"m (M = {widths})", "s", "lambda_max", "k_eff = P m^2 / s",
                      "slopes in M: m, s, lambda_max"], rows))


# ---------------------------------------------------------------- the document

def bridge_markdown(data: dict) -> str:
    """The whole-network code restricted to the comparison's subset (``results/ptb_bridge.json``)."""
    from .bridge import format_bridge

    return ("## Whole network restricted to the 512-coordinate subset\n\nFrom `results/ptb_bridge.json` "
            "(`experiments/bridge.py`).\n\n" + format_bridge(data))


SPECIAL = {"robustness.json": robustness_markdown, "retrain_check.json": retrain_markdown,
           "spectrum.json": spectrum_markdown, "ptb_bridge.json": bridge_markdown}


def results_markdown(results_dir: str | os.PathLike, tracked_only: bool = False) -> str:
    """docs/results.md's text: every ``*.json`` under ``results_dir`` rendered as markdown tables.

    Args:
        tracked_only: render only the files git tracks (the committed results), so that side runs' untracked
            outputs (``results/<run name>.json``) never leak into docs/results.md; a new study's file is rendered
            once it is ``git add``-ed. Outside a git checkout every file is rendered.
        results_dir: a directory of results files as the studies write them (``<tag>.json`` with ``training``,
            ``influence`` and/or ``ground_truth`` sections; ``robustness.json``, ``retrain_check.json``,
            ``spectrum.json``). A file of another shape is listed with its top-level keys.
    Returns:
        Markdown ending in a newline; the same files give the same text.
    Raises:
        NotADirectoryError: ``results_dir`` is not a directory (pass the folder holding the results JSON files).
        ValueError: a file is not valid JSON (its name is given).
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise NotADirectoryError(f"results_dir {str(root)!r} is not a directory; pass the folder holding results/*.json")
    files = {}
    tracked = _tracked(root) if tracked_only else None
    for path in sorted(root.glob("*.json")):
        if tracked is not None and path.name not in tracked:
            continue
        try:
            files[path.name] = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
    parts = [HEADER]
    if not files:
        parts.append(f"No results files under `{root.name}/` yet.")
    if training := training_markdown(files):
        parts.append(training)
    runs = {n: d["influence"] for n, d in files.items() if isinstance(d, dict) and d.get("influence")}
    if runs:
        parts.append("## Comparison with exact-Hessian influence\n\nFrom `<file>` key `influence` of each run.")
        parts += [influence_markdown(n, inf) for n, inf in runs.items()]
    truths = {n: d["ground_truth"] for n, d in files.items() if isinstance(d, dict) and d.get("ground_truth")}
    if truths:
        parts.append("## Ground truth by retraining the subset\n\nFrom `<file>` key `ground_truth`.")
        parts += [ground_truth_markdown(n, gt) for n, gt in truths.items()]
    for name, render in SPECIAL.items():
        if name in files:
            parts.append(render(files[name]))
    whole = [n for n, d in files.items() if isinstance(d, dict) and "top_sentences" in d and "curvatures" in d]
    if whole:
        from .whole_network import format_whole_network

        parts.append("## Whole-network influence\n\n" + "\n\n".join(
            f"From `{n}` (`experiments/whole_network.py`).\n\n{format_whole_network(files[n])}" for n in whole))
    lds = [n for n, d in files.items() if isinstance(d, dict) and "lds" in d and "design" in d]
    if lds:
        from .lds import format_lds

        parts.append("## Linear datamodeling score against retrained models (whole network)\n\n" + "\n\n".join(
            f"From `{n}` (`experiments/lds.py`, `scripts/lds.sh`).\n\n{format_lds(files[n])}" for n in lds))
    detection = [n for n, d in files.items() if isinstance(d, dict) and "table" in d and "models" in d
                 and "fraction" in d.get("config", {})]
    if detection:
        from .detection import format_detection, format_oga_comparison

        parts.append("## Corrupted-sentence detection\n\n" + "\n\n".join(
            f"From `{n}` (`experiments/detection.py`); mean +- std over seeds.\n\n" + "\n\n".join(
                f"**{m}**\n\n{format_detection(files[n]['table'], m)}" for m in ("auroc", "average_precision",
                                                                                 "recall@0.1"))
            + "\n\n**The Outlier Gradient Analysis claim** (Hessian-free gradient outliers detect as well as "
              "influence, or better; Chhabra et al. 2024): per kind the best ranking of each family by mean AUROC, "
              "the paired per-seed differences, and whether the claim held in every seed.\n\n"
            + format_oga_comparison(files[n]["table"]) for n in detection))
    apps = [n for n, d in files.items() if isinstance(d, dict) and "trimming" in d and "unlearning" in d]
    if apps:
        from . import applications as app

        parts.append("## Trimming, selection, replay buffer, unlearning\n\n" + "\n\n".join(
            f"From `{n}` (`experiments/applications.py`; {files[n]['trained_models']} of {files[n]['models']} models "
            f"trained).\n\n**Trimming**\n\n{app.format_perplexity(files[n]['trimming'], 'percent removed')}\n\n"
            f"**Selection**\n\n{app.format_perplexity(files[n]['selection'], 'percent kept')}\n\n"
            f"**Replay buffer** (PTB perplexity after task 2)\n\n{app.format_perplexity(files[n]['buffer'], 'buffer size')}"
            f"\n\n**Unlearning**\n\n{app.format_unlearning(files[n]['unlearning'])}" for n in apps))
    known = set(SPECIAL) | set(runs) | set(truths) | set(whole) | set(lds) | set(detection) | set(apps) | {
        n for n, d in files.items() if isinstance(d, dict) and d.get("training")}
    other = [n for n in files if n not in known]
    if other:
        parts.append("## Other results files\n\n" + "\n".join(
            f"- `{n}`: keys " + (", ".join(f"`{k}`" for k in files[n]) if isinstance(files[n], dict) else "(not an object)")
            for n in other))
    return "\n\n".join(p.strip("\n") for p in parts) + "\n"


def write_results_md(results_dir: str | os.PathLike, path: str | os.PathLike, tracked_only: bool = False) -> Path:
    """Write :func:`results_markdown` of ``results_dir`` (``tracked_only`` as there; ``experiments/report.py``
    passes True) to ``path`` atomically (:func:`ifutils.io.atomic_write`); returns the path."""
    text = results_markdown(results_dir, tracked_only=tracked_only)
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _tracked(root: Path) -> set[str] | None:
    """Names of the files under ``root`` that git tracks, or None outside a git checkout (or without git)."""
    import subprocess

    try:
        out = subprocess.run(["git", "ls-files", "--", "."], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return {Path(line).name for line in out.stdout.splitlines() if "/" not in line}
