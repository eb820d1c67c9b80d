"""The retraining ground truth of fisher_if.ipynb alone (ifutils.experiments.ground_truth.ground_truth_study), without the rest of
the comparison: for long runs, and to resume one. Writes the ``ground_truth`` section of results/<tag>.json and
figures/<tag>_retraining_*.png, with <tag> as in the notebook (ptb, ptb_decoder, ...).

Usage: IFUTILS_DATA_DIR=../shared/data .venv/bin/python experiments/ground_truth.py --subset recurrent --damping 3e-4
"""

from __future__ import annotations

import argparse
import time

import torch

from ifutils.data import load_corpus
from ifutils.experiments.comparison import InfluenceConfig, choose_samples
from ifutils.experiments.findings import ground_truth_table
from ifutils.experiments.ground_truth import (
    GroundTruthConfig,
    ground_truth_study,
    save_ground_truth,
)
from ifutils.io import check_corpus, load_checkpoint, project_path
from ifutils.subset import default_subset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ptb", choices=["ptb", "text8"])
    parser.add_argument("--checkpoint", default=None, help="default checkpoints/<dataset>_lstm.pt")
    parser.add_argument("--subset", default="recurrent", choices=["recurrent", "decoder", "lstm+decoder", "input"])
    parser.add_argument("--num-coords", type=int, default=512)
    parser.add_argument("--n", type=int, default=200, help="sentences of the re-solved objective")
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--loo", type=int, default=100)
    parser.add_argument("--groups", type=int, default=50)
    parser.add_argument("--group-size", type=int, default=10)
    parser.add_argument("--lds-subsets", type=int, default=100)
    parser.add_argument("--lds-fraction", type=float, default=0.5)
    parser.add_argument("--warm-start", default=None, help="a .pt file holding a previous theta*_S, (p,) float64")
    parser.add_argument("--cache", default="cache")
    parser.add_argument("--tag", default=None, help="results/<tag>.json; default <dataset>[_<subset>]")
    args = parser.parse_args()
    config = InfluenceConfig(subset=args.subset, num_coords=args.num_coords)
    gt = GroundTruthConfig(n=args.n, damping=args.damping, n_loo=args.loo, n_groups=args.groups,
                           group_size=args.group_size, lds_subsets=args.lds_subsets, lds_fraction=args.lds_fraction)
    model, vocab, payload = load_checkpoint(project_path(args.checkpoint or f"checkpoints/{args.dataset}_lstm.pt"))
    corpus = load_corpus(args.dataset, vocab=vocab)
    check_corpus(payload, corpus)
    samples = choose_samples(corpus, config)
    subset = default_subset(model, config.subset, config.num_coords, config.seed)
    subset_tag = "" if args.subset == "recurrent" else "_" + args.subset.replace("+", "_")
    tag = args.tag or f"{args.dataset}{subset_tag}"
    warm = torch.load(args.warm_start, weights_only=True) if args.warm_start else None
    start = time.perf_counter()
    results, plot_data = ground_truth_study(model, subset, vocab.stoi["<eos>"], samples, config, gt,
                                            project_path(args.cache), warm)
    save_ground_truth(results, plot_data, f"{corpus.name}, {args.subset} subset", project_path("figures"), tag,
                      project_path(f"results/{tag}.json"))
    print(ground_truth_table(results))
    print(f"ground truth: {time.perf_counter() - start:.0f} s; stages {results['seconds']}")


if __name__ == "__main__":
    main()
