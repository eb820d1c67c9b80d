"""Full-model retraining check of influence methods on PTB (``ifutils.experiments.retrain_check``; Basu et al. 2021).

Default setting (about 11 minutes on 2 uncontended CPU cores; several times longer when they are shared):

    IFUTILS_DATA_DIR=../shared/data .venv/bin/python experiments/retrain_check.py

Every ``RetrainConfig`` field is an option (``--n-train 5000 --seeds 0 1 2 --methods ggn random``). Writes
``results/retrain_check.json`` and ``figures/ptb_retrain_check.png``; each training is a checkpoint under
``checkpoints/retrain/``, so rerunning after a kill resumes.
"""

from __future__ import annotations

import argparse

from ifutils.config import add_arguments
from ifutils.data import load_corpus
from ifutils.experiments.plots import retrain_deltas
from ifutils.experiments.retrain_check import RetrainConfig, retrain_check
from ifutils.io import project_path, resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, RetrainConfig)
    parser.add_argument("--results", default="results/retrain_check.json")
    parser.add_argument("--figure", default="figures/ptb_retrain_check.png")
    parser.add_argument("--checkpoints", default="checkpoints/retrain")
    parser.add_argument("--cache", default="cache", help="chunk cache of the scoring passes")
    parser.add_argument("--device", default="auto")
    args = vars(parser.parse_args())
    paths = {k: project_path(args.pop(k)) for k in ("results", "figure", "checkpoints", "cache")}
    device = resolve_device(args.pop("device"))
    config = RetrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    results = retrain_check(load_corpus("ptb"), config, paths["checkpoints"], paths["results"], device,
                            paths["cache"])
    retrain_deltas(results, "PTB", paths["figure"])
    for method, entry in results["methods"].items():
        print(f"{method:>9}: delta valid ppl {entry['valid']['mean']:+.2f} +- {entry['valid']['std']:.2f} (seeds)")
    print(f"noise floor (full-data seed std): {results['noise_floor']['valid']:.2f}; wrote {paths['results']}")


if __name__ == "__main__":
    main()
