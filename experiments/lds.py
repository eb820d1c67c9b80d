"""Models retrained from scratch on random halves of the first 10,000 PTB training sentences, the ground truth of
the linear datamodeling score (``ifutils.experiments.lds``, ``ifutils.retrain``; issue 15).

    IFUTILS_DATA_DIR=../shared/data .venv/bin/python experiments/lds.py --stage choose           # full-data model, epochs
    IFUTILS_DATA_DIR=../shared/data .venv/bin/python experiments/lds.py --stage train --shard 0/2 &
    IFUTILS_DATA_DIR=../shared/data .venv/bin/python experiments/lds.py --stage train --shard 1/2 &

Every ``RetrainSpec`` and ``LdsConfig`` field is an option. ``--stage train`` takes the epoch count chosen by
``--stage choose`` (``<root>/.../epochs.json``) unless ``--epochs`` is given. Every model is its own checkpoint
under ``--root``; finished models are skipped, a killed one resumes from its last finished epoch, so the study can
be stopped and resumed at any point; two shards run side by side on two cores.
"""

from __future__ import annotations

import argparse
import json
import sys

from ifutils.config import add_arguments, from_args
from ifutils.data import load_corpus
from ifutils.experiments.lds import CHOICE_FILE, LdsConfig, choose_epochs, model_root, study_units, train_study
from ifutils.io import project_path, resolve_device
from ifutils.retrain import RetrainSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, RetrainSpec, exclude=("epochs",))
    add_arguments(parser, LdsConfig)
    parser.add_argument("--epochs", type=int, default=None, dest="chosen_epochs", help="epochs of every retrained model; default: the "
                        "count chosen by --stage choose")
    parser.add_argument("--stage", choices=("choose", "train", "status", "score"), required=True,
                        help="choose: the epoch count; train: the models; status: how many are finished; score: the "
                             "influence of every curvature and the LDS of the finished subsets (results/ptb_lds.json)")
    parser.add_argument("--n-queries", type=int, default=100, help="validation sentences whose losses are predicted")
    parser.add_argument("--dampings", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3, 1e-2, 1e-1],
                        help="absolute dampings of the sweep (besides the default, 0.1 x EK-FAC's mean eigenvalue)")
    parser.add_argument("--results", default="results/ptb_lds.json")
    parser.add_argument("--shard", default="0/1", help="i/k: train units j with j mod k == i (default 0/1: all)")
    parser.add_argument("--root", default="checkpoints/lds", help="where the models live")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    config = from_args(LdsConfig, args)
    base = from_args(RetrainSpec, args)
    root = project_path(args.root)
    corpus = load_corpus("ptb")
    if args.stage == "choose":
        choice = choose_epochs(corpus, base, config, root, resolve_device(args.device))
        print(f"chosen epochs: {choice['epochs']} (valid ppl "
              f"{[round(h['valid_ppl'], 1) for h in choice['history']]}); checkpoint {choice['checkpoint']}")
        return
    epochs = args.chosen_epochs
    if epochs is None:
        path = model_root(root, base) / CHOICE_FILE
        if not path.is_file():
            sys.exit(f"{path} is missing: run --stage choose first, or pass --epochs")
        epochs = json.loads(path.read_text())["epochs"]
    spec = from_args(RetrainSpec, args, epochs=epochs)
    if args.stage == "status":
        from ifutils.experiments.lds import study_root
        from ifutils.retrain import load_records

        units = study_units(spec, config)
        done = load_records(study_root(root, spec, config), units)
        print(f"{len(done)} of {len(units)} models finished under {study_root(root, spec, config)}")
        return
    if args.stage == "score":
        score(corpus, spec, config, root, args)
        return
    try:
        i, k = (int(x) for x in args.shard.split("/"))
    except ValueError:
        sys.exit(f"--shard must look like 0/2, got {args.shard!r}")
    finished = train_study(corpus, spec, config, root, (i, k), resolve_device(args.device))
    print(f"shard {i}/{k}: {len(finished)} models finished")


def score(corpus, spec, config, root, args) -> None:
    """Predictions of the full-data model for every curvature and damping, and the LDS of the finished subsets."""
    from dataclasses import asdict

    from ifutils.experiments.lds import lds_predictions, lds_table, measured_losses, query_indices, study_root
    from ifutils.experiments.whole_network import WholeNetworkConfig
    from ifutils.io import atomic_write, checkpoint_record, environment, load_checkpoint
    from ifutils.retrain import load_records, select_train

    choice = json.loads((model_root(root, spec) / CHOICE_FILE).read_text())
    model, _, _ = load_checkpoint(choice["checkpoint"], resolve_device(args.device))
    units = study_units(spec, config)
    records = load_records(study_root(root, spec, config), units)
    queries = query_indices(corpus, args.n_queries, config.subset_seed)
    masks, losses, _ = measured_losses(records, units, config.seeds, queries, spec.n_train)
    small = select_train(corpus, spec.n_train, range(spec.n_train))
    wconfig = WholeNetworkConfig()
    predictions, info = lds_predictions(model, small, spec.n_train, queries, wconfig, args.dampings,
                                        project_path("cache/lds_scores"), project_path("cache"))
    table = lds_table(predictions, masks, losses)
    out = {"spec": asdict(spec), "design": asdict(config), "M": int(masks.shape[0]), "S": len(config.seeds),
           "beta": config.beta, "queries": queries, "finished_models": len(records), "prediction": info,
           "whole_network_config": asdict(wconfig), "lds": table,
           "provenance": {"checkpoint": checkpoint_record(choice["checkpoint"])}, "environment": environment()}
    atomic_write(project_path(args.results), lambda tmp: tmp.write_text(json.dumps(out, indent=1, default=float)))
    for name, r in table.items():
        print(f"{name:>28s}: LDS {r['lds']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] (ceiling {r['ceiling']}) over "
              f"{r['subsets']} subsets")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
