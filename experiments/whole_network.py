"""Whole-network influence on the trained PTB model (``ifutils.experiments.whole_network``): KFAC / EK-FAC with
true-Fisher and data labels, diagonal true Fisher and EF, the identity, every training sentence scored against the
mean validation loss and ``--n-test`` test sentences, agreement with EK-FAC, the top sentences as text.

    IFUTILS_DATA_DIR=../shared/data .venv/bin/python experiments/whole_network.py

Every ``WholeNetworkConfig`` field is an option. Writes ``results/ptb_whole.json`` for the default settings
(``results/ptb_whole_<8 hex>.json`` otherwise); the factor fits, query gradients and exact solves are cached under
``--cache`` and the scores stream into ``--scores`` (one directory per configuration), so a rerun after a kill
resumes. ``whole_network.ipynb`` runs the same study and shows its tables and top sentences.

The small model of the LDS study (``experiments/lds.py``, trained on the first 10,000 sentences) is scored on the
sentences it was trained on:

    .venv/bin/python experiments/whole_network.py --checkpoint checkpoints/lds/<model>/full/model_epoch7.pt --n-exact 50

``--n-fit-sweep 50 100 400`` runs, instead of the study, EK-FAC's fit cost and scores against n_fit.
"""

from __future__ import annotations

import argparse
import re

from ifutils.config import add_arguments, from_args
from ifutils.data import load_corpus
from ifutils.experiments.whole_network import (
    WholeNetworkConfig,
    format_n_fit,
    format_whole_network,
    n_fit_sweep,
    whole_network_study,
)
from ifutils.experiments.runs import RunConfig, whole_network_run
from ifutils.retrain import select_train
from ifutils.io import check_corpus, load_checkpoint, project_path, resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, WholeNetworkConfig)
    parser.add_argument("--checkpoint", default="checkpoints/ptb_lstm.pt", help="the trained model (any path)")
    parser.add_argument("--results", default=None, help="default results/ptb_whole.json for the default settings, "
                        "results/ptb_whole_<8 hex> otherwise")
    parser.add_argument("--scores", default=None, help="root of the score directories (one per pass, named by what it depends on); default cache/whole_scores")
    parser.add_argument("--cache", default="cache", help="cache of factor fits and query gradients")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-fit-sweep", type=int, nargs="+", default=None, help="instead of the study: EK-FAC's "
                        "fit cost and scores against these n_fit values (results/<run>_nfit.json; needs the study's "
                        "exact reference, read from the cache or solved)")
    args = parser.parse_args()
    config = from_args(WholeNetworkConfig, args)
    model, vocab, payload = load_checkpoint(project_path(args.checkpoint), resolve_device(args.device))
    corpus = load_corpus("ptb", vocab=vocab)
    trained_on = re.fullmatch(r"ptb train\[:(\d+)\] (\d+) sentences \(\w+\)", str(payload.get("dataset")))
    if trained_on and trained_on.group(1) == trained_on.group(2):  # a small model of experiments/lds.py
        n = int(trained_on.group(1))
        corpus = select_train(corpus, n, range(n))
    check_corpus(payload, corpus)
    paths = whole_network_run(RunConfig(checkpoint=args.checkpoint, results_file=args.results), "ptb", config)
    scores = project_path(args.scores) if args.scores else paths["scores_dir"]
    if args.n_fit_sweep:
        out = paths["results_file"].with_name(paths["results_file"].stem + "_nfit.json")
        sweep = n_fit_sweep(model, corpus, config, args.n_fit_sweep, paths["checkpoint"], out, scores,
                            project_path(args.cache))
        print(format_n_fit(sweep))
        print(f"wrote {out}")
        return
    results = whole_network_study(model, corpus, config, paths["checkpoint"], paths["results_file"], scores,
                                  project_path(args.cache))
    print(format_whole_network(results))
    print(f"wrote {paths['results_file']}")


if __name__ == "__main__":
    main()
