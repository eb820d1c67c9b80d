"""Corrupted-sentence detection on the whole network (issue 16, item 1; ``ifutils.experiments.detection``).

    IFUTILS_DATA_DIR=../shared/data .venv/bin/python experiments/detection.py --stage train --shard 0/2 &
    IFUTILS_DATA_DIR=../shared/data .venv/bin/python experiments/detection.py --stage train --shard 1/2 &
    IFUTILS_DATA_DIR=../shared/data .venv/bin/python experiments/detection.py --stage score

``train``: one small model (``RetrainSpec``, epochs from the LDS study's choice) per corruption kind and seed, each
trained on the first 10,000 PTB sentences with 5 % of them corrupted; resumable per model, two shards side by side
(or two processes without ``--shard``: a model being trained is locked).
``score``: every ranking of every trained model (cached per model), the detection table (AUROC, average precision,
recall at 5/10/20 % inspected, mean +- std over seeds), results/ptb_detection.json (``_<hash>`` for another
configuration). ``status``: how many models are trained.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from ifutils.config import add_arguments, from_args
from ifutils.data import load_corpus
from ifutils.experiments.detection import (
    DetectionConfig,
    detection_units,
    format_detection,
    score_models,
    scored_models,
    train_models,
    unit_name,
)
from ifutils.experiments.lds import CHOICE_FILE, model_root
from ifutils.io import atomic_write, environment, project_path, resolve_device
from ifutils.retrain import RECORD_FILE, RetrainSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, RetrainSpec, exclude=("epochs",))
    add_arguments(parser, DetectionConfig)
    parser.add_argument("--epochs", type=int, default=None, dest="chosen_epochs",
                        help="training epochs; default: the LDS study's choice (experiments/lds.py --stage choose)")
    parser.add_argument("--stage", choices=("train", "score", "status"), required=True)
    parser.add_argument("--shard", default="0/1", help="i/k: train models j with j mod k == i")
    parser.add_argument("--root", default="checkpoints/detection", help="where the models live")
    parser.add_argument("--lds-root", default="checkpoints/lds", help="the LDS study's models (for the epoch count)")
    parser.add_argument("--results", default=None, help="default results/ptb_detection.json (a hash suffix for a "
                        "non-default configuration)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    config = from_args(DetectionConfig, args)
    base = from_args(RetrainSpec, args)
    epochs = args.chosen_epochs
    if epochs is None:
        path = model_root(project_path(args.lds_root), base) / CHOICE_FILE
        if not path.is_file():
            sys.exit(f"{path} is missing: run experiments/lds.py --stage choose first, or pass --epochs")
        epochs = json.loads(path.read_text())["epochs"]
    spec = from_args(RetrainSpec, args, epochs=epochs)
    root = model_root(project_path(args.root), spec) / f"e{spec.epochs}_fraction{config.fraction:g}"
    import torch

    torch.set_num_threads(spec.threads)  # --threads: 1 beside other processes (OpenMP waits thrash otherwise)
    torch.set_flush_denormal(True)  # subnormal floats to zero (below 1.2e-38; no effect on the results)
    corpus = load_corpus("ptb")
    from ifutils.experiments.runs import derive_name
    from ifutils.experiments.whole_network import WholeNetworkConfig

    wconfig = WholeNetworkConfig()
    drop = lambda d: {k: v for k, v in d.items() if k != "threads"}  # noqa: E731
    name = derive_name("ptb_detection", {**drop(asdict(spec)), **asdict(config)},
                       {**drop(asdict(RetrainSpec(epochs=spec.epochs))), **asdict(DetectionConfig())})
    out_path = project_path(args.results or f"results/{name}.json")
    header = json.loads(json.dumps({"spec": drop(asdict(spec)), "config": asdict(config),
                                    "whole_network_config": asdict(wconfig)}))
    scored = scored_models(out_path, header)  # scored in an earlier run (committed): neither trained nor scored again
    if args.stage == "status":
        units = detection_units(config)
        done = [u for u in units if (root / unit_name(*u) / RECORD_FILE).is_file() and unit_name(*u) not in scored]
        print(f"{len(scored)} of {len(units)} corrupted models scored in {out_path}; {len(done)} more trained under "
              f"{root}")
        return
    if args.stage == "train":
        try:
            shard = tuple(int(x) for x in args.shard.split("/"))
        except ValueError:
            sys.exit(f"--shard must look like 0/2, got {args.shard!r}")
        done = train_models(corpus, spec, config, root, shard, resolve_device(args.device), skip=set(scored))
        print(f"shard {args.shard}: {len(done)} models trained ({len(scored)} scored before, not retrained)")
        return

    def write(per_model, info):
        from ifutils.experiments.detection import detection_table

        out = {**header, "spec": asdict(spec), "table": detection_table(per_model, config), "models": info,
               "per_model": {unit_name(*key): metrics for key, metrics in per_model.items()},
               "environment": environment()}
        atomic_write(out_path, lambda tmp: tmp.write_text(json.dumps(out, indent=1, default=float)))
        print(f"wrote {out_path} ({len(info)} models)", flush=True)

    results = score_models(corpus, spec, config, wconfig, root, project_path("cache"), on_model=write,
                           scored=scored)
    for metric in ("auroc", "average_precision", "recall@0.1"):
        print(f"\n{metric}:\n{format_detection(results['table'], metric)}")


if __name__ == "__main__":
    main()
