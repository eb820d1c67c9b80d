"""Models retrained from scratch on random halves of the first 10,000 PTB training sentences, the ground truth of
the linear datamodeling score (``ifutils.experiments.lds``, ``ifutils.retrain``; issue 15).

    IFUTILS_DATA_DIR=../shared/data .venv/bin/python experiments/lds.py --stage choose           # full-data model, epochs
    IFUTILS_DATA_DIR=../shared/data .venv/bin/python experiments/lds.py --stage train --shard 0/2 &
    IFUTILS_DATA_DIR=../shared/data .venv/bin/python experiments/lds.py --stage train --shard 1/2 &

Every ``RetrainSpec`` and ``LdsConfig`` field is an option. ``--stage train`` takes the epoch count chosen by
``--stage choose`` (``<root>/.../epochs.json``) unless ``--epochs`` is given. Every model is its own checkpoint
under ``--root``; finished models are skipped, a killed one resumes from its last finished epoch, so the study can
be stopped and resumed at any point; two shards run side by side on two cores, or two processes on the whole list
(no ``--shard``): a model being trained is locked, so each process takes the next free one. Each finished model's
record (its measured losses) is also kept in ``--archive`` (default ``results/retrained/lds``, committed), so a fresh
clone skips the models of earlier sessions. Every study of issues 15
and 16 on two workers: ``bash scripts/studies.sh``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import numpy as np

from ifutils.config import add_arguments, from_args
from ifutils.data import load_corpus
from ifutils.experiments.lds import CHOICE_FILE, LdsConfig, choose_epochs, model_root, study_root, study_units, train_study
from ifutils.experiments.counterfactual import CounterfactualConfig
from ifutils.experiments.lds_methods import MethodsConfig
from ifutils.io import project_path, resolve_device
from ifutils.retrain import RetrainSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, RetrainSpec, exclude=("epochs",))
    add_arguments(parser, LdsConfig)
    parser.add_argument("--epochs", type=int, default=None, dest="chosen_epochs", help="epochs of every retrained model; default: the "
                        "count chosen by --stage choose")
    parser.add_argument("--stage", choices=("choose", "train", "status", "score", "sets", "removals"), required=True,
                        help="choose: the epoch count; train: the subset models; status: how many models are finished; "
                             "score: every method's predictions, the LDS of the finished subsets and the table of the "
                             "finished removals (results/ptb_lds.json); sets: the removal sets (removals.json); removals: the "
                             "counterfactual-removal models (computes the sets first when they are missing)")
    add_arguments(parser, MethodsConfig)
    add_arguments(parser, CounterfactualConfig, prefix="cf-")
    parser.add_argument("--results", default=None, help="results file of --stage score (default: results/ptb_lds.json "
                        "for the default configuration, results/ptb_lds_<hash>.json otherwise)")
    parser.add_argument("--shard", default="0/1", help="i/k: train units j with j mod k == i (default 0/1: all)")
    parser.add_argument("--root", default="checkpoints/lds", help="where the models live")
    parser.add_argument("--archive", default=None, help="folder in the repository that keeps a copy of every finished "
                        "model's record, the removal sets and each method group's predictions (commit it: a fresh "
                        "clone then skips that work). Default: results/retrained/lds with the default --root, else "
                        "none; 'none': no archive")
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
        check_full_model(choice, archive_for(args, model_root(root, base)))
        return
    epochs = args.chosen_epochs
    if epochs is None:
        path = model_root(root, base) / CHOICE_FILE
        if not path.is_file():
            sys.exit(f"{path} is missing: run --stage choose first, or pass --epochs")
        epochs = json.loads(path.read_text())["epochs"]
    spec = from_args(RetrainSpec, args, epochs=epochs)
    if args.stage == "status":
        from ifutils.experiments.counterfactual import REMOVALS_FILE
        from ifutils.retrain import load_records

        units = study_units(spec, config)
        done = load_records(study_root(root, spec, config), units, archive_for(args, study_root(root, spec, config)))
        print(f"{len(done)} of {len(units)} subset models finished under {study_root(root, spec, config)}")
        sets_file = removal_root(root, spec) / REMOVALS_FILE
        if sets_file.is_file():
            units = removal_study(corpus, spec, config, root, args)[1]
            done = load_records(removal_root(root, spec), units, archive_for(args, removal_root(root, spec)))
            print(f"{len(done)} of {len(units)} removal models finished under {removal_root(root, spec)}")
        return
    if args.stage == "sets":
        sets, units = removal_study(corpus, spec, config, root, args)
        print(f"{len(units)} removal models listed from {removal_root(root, spec) / 'removals.json'}")
        return
    if args.stage == "removals":
        from ifutils.retrain import run_units

        shard = _shard(args.shard)
        _, units = removal_study(corpus, spec, config, root, args)
        finished = run_units(corpus, spec, units, removal_root(root, spec), shard, resolve_device(args.device),
                             archive_for(args, removal_root(root, spec)))
        print(f"removals shard {shard[0]}/{shard[1]}: {len(finished)} models finished")
        return
    if args.stage == "score":
        import torch

        # subnormal floats to zero (values below 1.2e-38, no effect on the results): Hessian products of Arnoldi's
        # Krylov vectors, whose small coordinates underflow, otherwise run several times slower on CPU
        torch.set_flush_denormal(True)
        torch.set_num_threads(spec.threads)  # --threads: 1 beside the training shards (OpenMP waits thrash otherwise)
        score(corpus, spec, config, root, args)
        return
    i, k = _shard(args.shard)
    finished = train_study(corpus, spec, config, root, (i, k), resolve_device(args.device),
                           archive_for(args, study_root(root, spec, config)))
    print(f"shard {i}/{k}: {len(finished)} models finished")


def check_full_model(choice: dict, archive) -> bool:
    """Everything archived (predictions, removal sets, rankings) was computed from the full-data model, which each
    fresh clone retrains: keep its weights' SHA-256 in ``<archive>/full_model.json`` the first time, and say loudly
    when a retrained one differs (the archived predictions and rankings are then recomputed, not reused: their
    descriptions name the weights). Returns True when the weights equal the archived ones (or are archived now)."""
    from ifutils.io import atomic_write, load_checkpoint, weights_sha256

    if archive is None:
        return True
    digest = weights_sha256(load_checkpoint(choice["checkpoint"])[0])
    path = archive / "full_model.json"
    mine = {"weights_sha256": digest, "epochs": choice["epochs"],
            "valid_ppl": [h["valid_ppl"] for h in choice["history"]]}
    if not path.is_file():
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(mine, indent=1)))
        return True
    kept = json.loads(path.read_text())
    if kept["weights_sha256"] == digest:
        print(f"the full-data model's weights equal the archived ones ({digest[:16]})")
        return True
    print(f"WARNING: the retrained full-data model differs from the one the archive was computed with "
          f"({digest[:16]} here, {kept['weights_sha256'][:16]} in {path}; valid ppl {mine['valid_ppl']} against "
          f"{kept['valid_ppl']}): the archived predictions and rankings will be recomputed, and the archived "
          f"removal sets were chosen with the other model", file=sys.stderr)
    return False


def _shard(text: str) -> tuple[int, int]:
    try:
        i, k = (int(x) for x in text.split("/"))
    except ValueError:
        sys.exit(f"--shard must look like 0/2, got {text!r}")
    return i, k


def archive_for(args, path):
    """The archive folder of the models under ``path`` (a folder below ``--root``): ``--archive`` / the same relative
    path, or None with ``--archive none`` or with another ``--root`` and no ``--archive``
    (``ifutils.retrain.archive_record``)."""
    from pathlib import Path

    if args.archive == "none" or (args.archive is None and args.root != "checkpoints/lds"):
        return None  # a run from scratch under another --root neither reads nor writes the committed archive
    return project_path(args.archive or "results/retrained/lds") / Path(path).relative_to(project_path(args.root))


def removal_root(root, spec):
    """Where the counterfactual-removal models and ``removals.json`` live."""
    return model_root(root, spec) / f"e{spec.epochs}_removals"


def _context(corpus, spec, config, root, args, stages=None):
    """The LDS :class:`Context` of the full-data model (shared by --stage score and --stage removals)."""
    from ifutils.experiments.lds import measured_losses, query_indices, study_root
    from ifutils.experiments.lds_methods import Context
    from ifutils.experiments.whole_network import Stages, WholeNetworkConfig
    from ifutils.io import load_checkpoint
    from ifutils.retrain import load_records, select_train

    mconfig = from_args(MethodsConfig, args)
    choice = json.loads((model_root(root, spec) / CHOICE_FILE).read_text())
    model, _, _ = load_checkpoint(choice["checkpoint"], resolve_device(args.device))
    units = study_units(spec, config)
    records = load_records(study_root(root, spec, config), units, archive_for(args, study_root(root, spec, config)))
    queries = query_indices(corpus, mconfig.n_queries, config.subset_seed)
    masks, losses, _ = measured_losses(records, units, config.seeds, queries, spec.n_train)
    small = select_train(corpus, spec.n_train, range(spec.n_train))
    full = model_root(root, spec) / "full"
    checkpoints = [(str(full / f"model_epoch{h['epoch']}.pt"), h["lr"]) for h in choice["history"][: spec.epochs]]
    kept = archive_for(args, study_root(root, spec, config))
    ctx = Context(model, small, masks, queries, mconfig, WholeNetworkConfig(), checkpoints, project_path("cache"),
                  stages or Stages(), archive_dir=None if kept is None else kept / "predictions")
    return ctx, {"choice": choice, "records": records, "losses": losses, "masks": masks, "mconfig": mconfig}


def removal_study(corpus, spec, config, root, args, ctx=None):
    """(removal sets, units) of the counterfactual removals: the sets from ``removals.json``, or scored and written."""
    from ifutils.experiments.counterfactual import load_or_write_sets, removal_scores, removal_sets, removal_units

    cf = from_args(CounterfactualConfig, args, prefix="cf-")
    out = removal_root(root, spec)

    def compute():
        context = ctx or _context(corpus, spec, config, root, args)[0]
        scores = removal_scores(context, cf, project_path("cache/lds_removal_scores") / context.masks_key)
        return removal_sets(scores, cf, spec.n_train)

    sets = load_or_write_sets(out, compute, cf, archive_for(args, out))
    return sets, removal_units(sets, cf, spec.n_train)


def results_path(args, spec, config, mconfig, wconfig) -> str:
    """``--results`` if given; else results/ptb_lds.json for the default design and methods, and
    results/ptb_lds_<8 hex>.json for any other (a run never overwrites another configuration's results)."""
    if args.results:
        return args.results
    from ifutils.experiments.runs import derive_name
    from ifutils.experiments.whole_network import WholeNetworkConfig

    drop = lambda d: {k: v for k, v in d.items() if k not in ("threads", "chunk_size", "groups")}  # noqa: E731
    settings = {**drop(asdict(spec)), **drop(asdict(config)), **drop(asdict(mconfig)), **drop(asdict(wconfig))}
    defaults = {**drop(asdict(RetrainSpec(epochs=spec.epochs))), **drop(asdict(LdsConfig())),
                **drop(asdict(MethodsConfig())), **drop(asdict(WholeNetworkConfig()))}
    return f"results/{derive_name('ptb_lds', settings, defaults)}.json"


def guard_results(out_path, complete: int, explicit: bool):
    """(path to write, redirected?): ``out_path``, or ``cache/<name>.partial.json`` when it was not named explicitly
    and already holds more complete subsets than ``complete`` (a fresh clone whose subset models are not all
    restored yet: the predictions are still computed and archived, as they need only the full-data model, but the
    committed LDS is never replaced by one over fewer subsets, and no figure is drawn)."""
    if explicit or not out_path.is_file() or json.loads(out_path.read_text()).get("complete_subsets", 0) <= complete:
        return out_path, False
    partial = project_path("cache") / f"{out_path.stem}.partial{out_path.suffix}"
    print(f"{out_path} holds more complete subsets than the {complete} here: writing {partial} (no figures)")
    return partial, True


def score(corpus, spec, config, root, args) -> None:
    """Every method's predictions on the full-data model and the LDS over the finished subsets; the results file is
    rewritten after each method group, so a stopped run keeps what it finished and a rerun reads it back."""
    from ifutils.experiments.counterfactual import REMOVALS_FILE, format_removals, removal_table
    from ifutils.experiments.lds import best_dampings, lds_differences, lds_table, study_root
    from ifutils.experiments.lds_methods import method_predictions
    from ifutils.experiments.whole_network import Stages
    from ifutils.io import atomic_write, checkpoint_record, environment
    from ifutils.retrain import load_records, wait_for_units

    # a subset model another process is finishing (the other worker's last one) is waited for: the losses are
    # read once, below, for the whole run
    wait_for_units(study_root(root, spec, config), study_units(spec, config))
    stages = Stages()
    ctx, state = _context(corpus, spec, config, root, args, stages)
    mconfig, losses, masks, choice = state["mconfig"], state["losses"], state["masks"], state["choice"]
    out_path = project_path(results_path(args, spec, config, mconfig, ctx.wconfig))
    complete = int((~np.isnan(losses).any(axis=(1, 2))).sum())
    out_path, redirected = guard_results(out_path, complete, explicit=bool(args.results))
    cf = from_args(CounterfactualConfig, args, prefix="cf-")
    removals = None
    if (removal_root(root, spec) / REMOVALS_FILE).is_file():
        _, units = removal_study(corpus, spec, config, root, args, ctx)
        removals = {"config": asdict(cf), "models": len(units),
                    "finished": len(load_records(removal_root(root, spec), units, archive_for(args, removal_root(root, spec)))),
                    "table": removal_table(load_records(removal_root(root, spec), units,
                                                        archive_for(args, removal_root(root, spec))), cf, ctx.queries)}
        print(format_removals(removals["table"]))

    def write(group, predictions):
        table = lds_table(predictions, losses, mconfig.n_solver_queries) if complete >= 3 else {}
        differences = lds_differences(predictions, losses) if complete >= 3 else {}
        differences_best = lds_differences(predictions, losses, at="best", table=table) if complete >= 3 else {}
        out = {"spec": asdict(spec), "design": asdict(config), "methods_config": asdict(mconfig),
               "whole_network_config": asdict(ctx.wconfig), "M": int(masks.shape[0]), "complete_subsets": complete,
               "S": len(config.seeds), "beta": config.beta, "queries": ctx.queries,
               "finished_models": len(state["records"]), "default_damping": ctx.default_damping,
               "groups_done": sorted({g for v in predictions.values()
                                      for g in (v["group"], *v["meta"].get("extended_by", []))}),
               "methods": {k: {"group": v["group"], "dampings": v["dampings"], "default_damping": v["default_damping"],
                               "meta": v["meta"]} for k, v in predictions.items()},
               "spectrum": ctx._spectrum, "lds": table, "differences": differences,
               "differences_best": differences_best, "best": best_dampings(table),
               "counterfactual": removals,
               "stages": stages.records,
               "provenance": {"checkpoint": checkpoint_record(choice["checkpoint"]), "epochs": spec.epochs,
                              "tracin_checkpoints": ctx.checkpoints},
               "environment": environment()}
        atomic_write(out_path, lambda tmp: tmp.write_text(json.dumps(out, indent=1, default=float)))
        print(f"[{group}] wrote {out_path} ({complete} complete subsets)", flush=True)

    predictions = method_predictions(ctx, on_group=write)
    if complete >= 3 and not redirected:
        from ifutils.experiments.plots import lds_by_method, lds_vs_damping

        results = json.loads(out_path.read_text())
        title = (f"PTB, width-128 LSTM on {spec.n_train:,} sentences: LDS over {complete} subsets x "
                 f"{len(config.seeds)} seeds")
        for kind, draw in (("methods", lds_by_method), ("damping", lds_vs_damping)):
            figure = project_path(f"figures/{out_path.stem}_{kind}.png")
            draw(results, title, figure)
            print(f"wrote {figure}")
        for name, r in lds_table(predictions, losses, mconfig.n_solver_queries).items():
            print(f"{name:>28s}: LDS {r['lds']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] (ceiling {r['ceiling']:.3f}) "
                  f"over {r['subsets']} subsets, {r['queries']} queries")


if __name__ == "__main__":
    main()
