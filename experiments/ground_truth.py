"""The retraining ground truth of fisher_if.ipynb alone (ifutils.experiments.ground_truth.ground_truth_study), without the rest of
the comparison: for long runs, and to resume one. Writes the ``ground_truth`` section of results/<tag>.json and
figures/<tag>_retraining_*.png, with <tag> as in the notebook (ptb, ptb_decoder, ...).

Usage: IFUTILS_DATA_DIR=../shared/data .venv/bin/python experiments/ground_truth.py --subset recurrent --damping 1e-3

Every GroundTruthConfig and InfluenceConfig field is an option (defaults and help from the dataclasses).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ifutils.config import add_arguments, from_args
from ifutils.data import load_corpus
from ifutils.experiments.comparison import InfluenceConfig, choose_samples
from ifutils.experiments.findings import ground_truth_table
from ifutils.experiments.ground_truth import (
    GroundTruthConfig,
    ground_truth_study,
    save_ground_truth,
)
from ifutils.experiments.runs import derive_name
from ifutils.io import (
    check_corpus,
    check_results_checkpoint,
    load_checkpoint,
    project_path,
)
from ifutils.subset import default_subset

# The comparison settings the committed results/ptb*.json ground-truth sections ran with (InfluenceConfig's
# defaults before the 30-minute main job lowered them), pinned so this command reproduces them.
PINNED = {"n_hessian": 500, "mc_error_ks": (1, 2, 4, 8, 16, 32, 64)}


def run_tag(base: str, config: InfluenceConfig, gt: GroundTruthConfig, checkpoint: str | None, dataset: str) -> str:
    """``base`` (``ptb``, ``ptb_decoder``, ...) when every setting is this command's default and the checkpoint is
    the default one, else ``base_<8 hex>`` hashing the settings that differ (as the notebooks name side runs), so
    a trial run never writes into the committed results or figures."""
    settings = {**{k: v for k, v in config.to_dict().items() if k not in ("subset", "chunk_size")},
                **{f"gt_{k}": v for k, v in gt.to_dict().items()}, "checkpoint": checkpoint}
    defaults = {**InfluenceConfig(**PINNED).to_dict(), **{f"gt_{k}": v for k, v in GroundTruthConfig().to_dict().items()},
                "checkpoint": None}
    if checkpoint is not None and Path(checkpoint).resolve() == project_path(f"checkpoints/{dataset}_lstm.pt").resolve():
        settings["checkpoint"] = None
    return derive_name(base, settings, defaults)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ptb", choices=["ptb", "text8"])
    parser.add_argument("--checkpoint", default=None, help="default checkpoints/<dataset>_lstm.pt (any path)")
    add_arguments(parser, GroundTruthConfig)
    add_arguments(parser, InfluenceConfig, exclude={"seed"}, **PINNED)
    parser.add_argument("--warm-start", default=None, help="a .pt file holding a previous theta*_S, (p,) float64")
    parser.add_argument("--cache", default="cache")
    parser.add_argument("--tag", default=None, help="results/<tag>.json; default <dataset>[_<subset>] for this command's defaults, with a hash of the differing settings otherwise")
    args = parser.parse_args()
    config = from_args(InfluenceConfig, args, seed=args.seed)
    gt = from_args(GroundTruthConfig, args)
    checkpoint = project_path(args.checkpoint or f"checkpoints/{args.dataset}_lstm.pt")
    model, vocab, payload = load_checkpoint(checkpoint)
    corpus = load_corpus(args.dataset, vocab=vocab)
    check_corpus(payload, corpus)
    samples = choose_samples(corpus, config)
    subset = default_subset(model, config.subset, config.num_coords, config.seed)
    subset_tag = "" if config.subset == "recurrent" else "_" + config.subset.replace("+", "_")
    tag = args.tag or run_tag(f"{args.dataset}{subset_tag}", config, gt, args.checkpoint, args.dataset)
    print(f"run {tag!r}: results/{tag}.json, figures/{tag}_retraining_*.png")
    check_results_checkpoint(project_path(f"results/{tag}.json"), "ground_truth", checkpoint, tag)
    warm = torch.load(args.warm_start, weights_only=True) if args.warm_start else None
    start = time.perf_counter()
    results, plot_data = ground_truth_study(model, subset, vocab.stoi["<eos>"], samples, config, gt,
                                            project_path(args.cache), warm)
    save_ground_truth(results, plot_data, f"{corpus.name}, {config.subset} subset", project_path("figures"), tag,
                      project_path(f"results/{tag}.json"), checkpoint)
    print(ground_truth_table(results))
    print(f"ground truth: {time.perf_counter() - start:.0f} s; stages {results['seconds']}")


if __name__ == "__main__":
    main()
