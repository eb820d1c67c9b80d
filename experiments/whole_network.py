"""Whole-network influence on the trained PTB model (``ifutils.experiments.whole_network``): KFAC / EK-FAC with
true-Fisher and data labels, diagonal true Fisher and EF, the identity, every training sentence scored against the
mean validation loss and ``--n-test`` test sentences, agreement with EK-FAC, the top sentences as text.

    IFUTILS_DATA_DIR=../shared/data .venv/bin/python experiments/whole_network.py

Every ``WholeNetworkConfig`` field is an option. Writes ``results/ptb_whole.json`` for the default settings
(``results/ptb_whole_<8 hex>.json`` otherwise); the factor fits, query gradients and exact solves are cached under
``--cache`` and the scores stream into ``--scores`` (one directory per configuration), so a rerun after a kill
resumes. ``whole_network.ipynb`` runs the same study and shows its tables and top sentences.
"""

from __future__ import annotations

import argparse

from ifutils.config import add_arguments, from_args
from ifutils.data import load_corpus
from ifutils.experiments.whole_network import (
    WholeNetworkConfig,
    format_whole_network,
    whole_network_study,
)
from ifutils.experiments.runs import RunConfig, whole_network_run
from ifutils.io import check_corpus, load_checkpoint, project_path, resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, WholeNetworkConfig)
    parser.add_argument("--checkpoint", default="checkpoints/ptb_lstm.pt", help="the trained model (any path)")
    parser.add_argument("--results", default=None, help="default results/ptb_whole.json for the default settings, "
                        "results/ptb_whole_<8 hex> otherwise")
    parser.add_argument("--scores", default=None, help="score directory; default cache/whole_scores/<config hash>")
    parser.add_argument("--cache", default="cache", help="cache of factor fits and query gradients")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    config = from_args(WholeNetworkConfig, args)
    model, vocab, payload = load_checkpoint(project_path(args.checkpoint), resolve_device(args.device))
    corpus = load_corpus("ptb", vocab=vocab)
    check_corpus(payload, corpus)
    paths = whole_network_run(RunConfig(checkpoint=args.checkpoint, results_file=args.results), "ptb", config)
    scores = project_path(args.scores) if args.scores else paths["scores_dir"]
    results = whole_network_study(model, corpus, config, paths["checkpoint"], paths["results_file"], scores,
                                  project_path(args.cache))
    print(format_whole_network(results))
    print(f"wrote {paths['results_file']}")


if __name__ == "__main__":
    main()
