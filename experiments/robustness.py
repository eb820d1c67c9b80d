"""Robustness sweeps of the Fisher-vs-Hessian comparison on PTB (ifutils.experiments.sweeps), one figure and table each.

Sweeps (each resumable: finished settings are kept in the results file and skipped on a rerun):
  estimation   sentences per curvature estimate, Monte Carlo label draws, and damping (main model)
  subsets      recurrent, input-to-hidden, decoder, embedding rows (main model)
  seeds        model seeds 0, 1, 2 (checkpoints/ptb_lstm.pt, ptb_lstm_s1.pt, ptb_lstm_s2.pt)
  checkpoints  epochs 1, 3, 5 of the seed-1 model (checkpoints/ptb_lstm_s1_epoch{k}.pt)
  widths       hidden width 64, 128, 256 (checkpoints/ptb_lstm_h64.pt, ptb_lstm_h128.pt, ptb_lstm.pt)
Models come from experiments/train_family.sh; a missing checkpoint skips its setting with a message.

Usage: IFUTILS_DATA_DIR=../shared/data .venv/bin/python experiments/robustness.py [--sweeps estimation subsets ...]

Every InfluenceConfig field is an option (help from the dataclass; the committed run's values pinned).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from ifutils.config import add_arguments, from_args
from ifutils.data import load_corpus
from ifutils.experiments import plots
from ifutils.experiments.comparison import InfluenceConfig, choose_samples
from ifutils.experiments.sweeps import estimation_rows, setting_rows
from ifutils.io import load_checkpoint, project_path, update_results
from ifutils.subset import SubsetLoss, default_subset

MODELS = {
    "seeds": [("seed", s, f"checkpoints/{name}.pt") for s, name in ((0, "ptb_lstm"), (1, "ptb_lstm_s1"), (2, "ptb_lstm_s2"))],
    "checkpoints": [("epoch", k, f"checkpoints/ptb_lstm_s1_epoch{k}.pt") for k in (1, 3, 5)],
    "widths": [("width", m, f"checkpoints/{name}.pt") for m, name in ((64, "ptb_lstm_h64"), (128, "ptb_lstm_h128"),
                                                                      (256, "ptb_lstm"))],
    "subsets": [("subset", kind, "checkpoints/ptb_lstm.pt") for kind in ("recurrent", "input", "decoder", "embedding")],
}
CATEGORICAL = {"seeds", "subsets"}
# The settings results/robustness.json was computed with, pinned here (not InfluenceConfig's defaults, which the
# 30-minute main job lowered): a model sweep recomputes every point when the stored configuration differs.
# default_damping is the lambda of the estimation sweeps (model sweeps use ifutils.curvature.scale_damping);
# absolute_dampings the lambda values of the damping sweep and of each setting's best damping (6 decades).
PINNED = {"n_hessian": 200, "n_train": 500, "default_damping": 3e-4,
          "absolute_dampings": tuple(10.0 ** k for k in range(-6, 1)), "mc_error_ks": (1, 2, 4, 8, 16, 32, 64)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweeps", nargs="+", default=["estimation", *MODELS], choices=["estimation", *MODELS])
    add_arguments(parser, InfluenceConfig, **PINNED)
    parser.add_argument("--counts", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--mc-draws", type=int, nargs="+", default=[1, 2, 4, 16, 64])
    parser.add_argument("--results", default="results/robustness.json")
    parser.add_argument("--figures", default="figures")
    parser.add_argument("--cache", default="cache")
    args = parser.parse_args()
    config = from_args(InfluenceConfig, args, top_k=min(args.top_k, args.n_train))
    results, figures = project_path(args.results), project_path(args.figures)
    corpus = load_corpus("ptb")
    samples = choose_samples(corpus, config)
    for sweep in args.sweeps:
        start = time.perf_counter()
        if sweep == "estimation":
            run_estimation(config, samples, args, results, figures)
        else:
            run_models(sweep, config, samples, args, results, figures)
        print(f"{sweep}: {time.perf_counter() - start:.0f} s")


def run_estimation(config, samples, args, results, figures) -> None:
    model, vocab, _ = load_checkpoint(project_path("checkpoints/ptb_lstm.pt"))
    loss = SubsetLoss(model, default_subset(model, config.subset, config.num_coords, config.seed), vocab.stoi["<eos>"])
    start = time.perf_counter()
    rows = estimation_rows(loss, samples, config, tuple(args.counts), tuple(args.mc_draws), args.cache)
    update_results(results, "estimation", {"config": config.to_dict(), **rows, "seconds": time.perf_counter() - start})
    label = f"PTB, recurrent subset p={config.num_coords}: Spearman with exact-Hessian influence (95% CI over test sentences)"
    plots.sweep_with_ci(rows["sentences"], "sentences", "spearman", label, figures / "ptb_robustness_sentences.png",
                        xlabel="sentences each curvature is estimated from (reference: H from all)")
    plots.sweep_with_ci(rows["mc_draws"], "mc_draws", "spearman", label, figures / "ptb_robustness_mc_draws.png",
                        xlabel="Monte Carlo label draws per position")
    plots.sweep_with_ci(rows["damping"], "lambda", "spearman", label, figures / "ptb_robustness_damping.png",
                        xlabel=f"damping lambda of the curvature (reference: H + {config.default_damping:g} I)")


def run_models(sweep, config, samples, args, results, figures) -> None:
    done = json.loads(results.read_text()).get(sweep, {}) if results.is_file() else {}
    same = done.get("config") == json.loads(json.dumps(config.to_dict()))  # a changed config recomputes every point
    points = done.get("points", {}) if same else {}
    for field, value, path in MODELS[sweep]:
        label = str(value)
        if label in points:
            continue
        if not Path(project_path(path)).is_file():
            print(f"{sweep}: {path} is missing; train it with experiments/train_family.sh, then rerun this sweep")
            continue
        start = time.perf_counter()
        model, vocab, _ = load_checkpoint(project_path(path))
        point_config = dataclasses.replace(config, subset=value) if field == "subset" else config
        rows, extra = setting_rows(model, vocab.stoi["<eos>"], samples, point_config, {field: value}, args.cache)
        points[label] = {"rows": rows, **extra, "checkpoint": path, "seconds": time.perf_counter() - start}
        update_results(results, sweep, {"config": config.to_dict(), "points": points})
        print(f"{sweep} {field}={value}: {points[label]['seconds']:.0f} s")
    rows = [r for p in points.values() for r in p["rows"]]
    if rows:
        field = MODELS[sweep][0][0]
        plots.sweep_with_ci(rows, field, "spearman",
                            f"PTB: Spearman with exact-Hessian influence across {sweep} (95% CI over test sentences)",
                            figures / f"ptb_robustness_{sweep}.png", xscale="linear", categorical=sweep in CATEGORICAL,
                            xlabel=field)


if __name__ == "__main__":
    main()
