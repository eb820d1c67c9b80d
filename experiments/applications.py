"""Trimming, data selection, a continual-learning replay buffer and unlearning (issue 16, items 2-5;
``ifutils.experiments.applications``), on the small model of the LDS study.

    IFUTILS_DATA_DIR=../shared/data .venv/bin/python experiments/applications.py --stage rank
    IFUTILS_DATA_DIR=../shared/data .venv/bin/python experiments/applications.py --stage train --shard 0/2 &
    IFUTILS_DATA_DIR=../shared/data .venv/bin/python experiments/applications.py --stage train --shard 1/2 &
    IFUTILS_DATA_DIR=../shared/data .venv/bin/python experiments/applications.py --stage score

``rank``: every ranking of the full-data model of ``experiments/lds.py`` (cached; the LDS study's ``choose`` stage
must have run). ``train``: every retrained model (unlearning retrains, the buffer's second task, selection,
trimming, in that order), each resumable, shards side by side. ``score``: the tables of the finished models and the
Newton unlearning steps, results/ptb_applications.json (``_<hash>`` for another configuration). The second task
reads the text8-format file of ``load_corpus("text8")`` (the 2.2 MB sample here; the full text8 when present).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import numpy as np

from ifutils.cache import fingerprint
from ifutils.config import add_arguments, from_args
from ifutils.data import load_corpus
from ifutils.experiments import applications as app
from ifutils.experiments.detection import DetectionConfig, rankings
from ifutils.experiments.lds import CHOICE_FILE, model_root
from ifutils.io import environment, load_checkpoint, project_path, resolve_device, weights_sha256
from ifutils.retrain import RECORD_FILE, RetrainSpec, Unit, load_records, select_train, train_unit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, RetrainSpec, exclude=("epochs",))
    add_arguments(parser, app.ApplicationsConfig)
    add_arguments(parser, DetectionConfig, prefix="rank-", exclude=("fraction", "kinds", "seeds", "inspected"))
    parser.add_argument("--stage", choices=("rank", "train", "score", "status"), required=True)
    parser.add_argument("--shard", default="0/1", help="i/k: train models j with j mod k == i")
    parser.add_argument("--lds-root", default="checkpoints/lds", help="the LDS study's models")
    parser.add_argument("--results", default=None, help="default results/ptb_applications.json")
    parser.add_argument("--archive", default=None, help="folder in the repository that keeps the rankings and a copy "
                        "of every finished model's record but the unlearning retrains' (whose weights the score "
                        "reads); commit it: a fresh clone then skips those models. Default: "
                        "results/retrained/applications with the default --lds-root, else none; 'none': no archive")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    config = from_args(app.ApplicationsConfig, args)
    base = from_args(RetrainSpec, args)
    choice_path = model_root(project_path(args.lds_root), base) / CHOICE_FILE
    if not choice_path.is_file():
        sys.exit(f"{choice_path} is missing: run experiments/lds.py --stage choose first")
    choice = json.loads(choice_path.read_text())
    spec = from_args(RetrainSpec, args, epochs=choice["epochs"])
    root = model_root(project_path(args.lds_root), spec) / f"e{spec.epochs}_applications"
    archive = default_archive(args)
    if archive is not None:
        archive = archive / root.relative_to(project_path(args.lds_root))
    import torch

    torch.set_num_threads(spec.threads)  # --threads: 1 beside other processes (OpenMP waits thrash otherwise)
    torch.set_flush_denormal(True)  # subnormal floats to zero (below 1.2e-38; no effect on the results)
    corpus = load_corpus("ptb")
    small = select_train(corpus, spec.n_train, range(spec.n_train))
    device = resolve_device(args.device)
    full, _, _ = load_checkpoint(choice["checkpoint"], device)
    from ifutils.experiments.whole_network import WholeNetworkConfig

    wconfig = WholeNetworkConfig()
    rank_config = from_args(DetectionConfig, args, prefix="rank-")  # the rankings' settings (--rank-*)
    # the rankings the units are built from, kept in the repository once computed (a fresh clone reads them back:
    # the same trimmed and selected sets as the archived models)
    kept_rankings = None if archive is None else archive / "rankings"
    needed = sorted({*config.methods, *config.buffer_methods})
    description = {"weights_sha256": weights_sha256(full), "rank_config": asdict(rank_config),
                   "whole_network_config": asdict(wconfig), "methods": needed}
    ranked = app.archived_rankings(kept_rankings, description)
    if ranked is None:
        ranked = rankings(full, small, spec, rank_config, wconfig, project_path("cache"),
                          compute=args.stage != "status")
        if ranked is not None and kept_rankings is not None:
            app.archive_rankings(kept_rankings, description, {k: ranked[0][k] for k in needed}, ranked[1])
    if ranked is None:  # status only: the units depend on the rankings, which --stage rank computes
        trained = sum(1 for _ in root.glob(f"*/{RECORD_FILE}")) if root.is_dir() else 0
        print(f"the full-data model's rankings are not computed yet (run --stage rank); {trained} application "
              f"models trained under {root}")
        sys.exit(3)  # scripts/studies.sh waits on this code
    harm, dampings = ranked
    if args.stage == "rank":
        print(f"rankings of {choice['checkpoint']} (damping {dampings['damping']:.3g}): {', '.join(harm)}")
        return
    units, task2 = plan(corpus, small, spec, config, harm)
    # the records' folder is named after everything the units' training sets depend on (the rankings themselves,
    # the design, the second task's corpus, the weights the buffer models start from): a record of another design
    # can never be taken for one of this design
    design = fingerprint(asdict(config), task2.name, len(task2.splits["train"]), weights_sha256(full),
                         {k: torch.as_tensor(np.asarray(harm[k])) for k in needed})[:10]
    records_dir = None if archive is None else archive / f"units_{design}"
    kept = lambda unit: None if unit.name.startswith("unlearn_retrain") else records_dir  # noqa: E731
    if args.stage == "status":
        done = load_records(root, [u for u, *_ in units], records_dir)
        print(f"{len(done)} of {len(units)} application models trained under {root}")
        return
    if args.stage == "train":
        import torch

        from ifutils.retrain import archived_record, train_each

        i, k = (int(x) for x in args.shard.split("/"))
        torch.set_num_threads(spec.threads)
        mine = [u for j, u in enumerate(units) if j % k == i]
        todo = [u for u in mine if not (root / u[0].name / RECORD_FILE).is_file()
                and archived_record(kept(u[0]), u[0].name) is None]
        print(f"{len(mine)} models in shard {i}/{k}: {len(mine) - len(todo)} trained, {len(todo)} to train")
        train_each([(unit.name, lambda unit=unit, data=data, unit_spec=unit_spec, init=init, splits=splits:
                     train_unit(data, unit_spec, unit, root, device, splits=splits, init=full if init else None,
                                archive=kept(unit)))
                    for unit, data, unit_spec, init, splits in todo], f"applications (shard {i}/{k})")
        return
    score(corpus, small, spec, config, wconfig, root, full, choice, units, task2, args, rank_config, records_dir)


def default_archive(args):
    """``--archive`` as a Path, or None: 'none', or left out with a --lds-root other than the default (a run from
    scratch elsewhere neither reads nor writes the committed archive)."""
    if args.archive == "none" or (args.archive is None and args.lds_root != "checkpoints/lds"):
        return None
    return project_path(args.archive or "results/retrained/applications")


def plan(corpus, small, spec, config, harm):
    """[(unit, training corpus, spec, init from the full-data model?, splits measured)] in training order, and the
    second task's corpus."""
    from ifutils.data import text8_file

    n = spec.n_train
    out = []
    forget = app.forget_set(config, n)
    keep = tuple(i for i in range(n) if i not in set(forget))
    out += [(Unit(f"unlearn_retrain_s{s}", keep, s), small, spec, False, ("valid", "test")) for s in config.seeds]
    path, _ = text8_file(None, allow_download=False)
    task2 = app.task2_corpus(corpus, path, config.window, config.task2_words)
    for (method, b), idx in app.buffers(harm, config, n).items():
        data = app.buffer_corpus(task2, small, idx, n)
        unit_spec = app.buffer_spec(spec, config, len(data.splits["train"]))
        out += [(Unit(f"buffer_{app._tag(method)}_{b}_s{s}", tuple(range(len(data.splits["train"]))), s), data,
                 unit_spec, True, ("valid", "test", "ptb_valid")) for s in config.seeds]
    out += [(u, small, spec, False, ("valid", "test")) for u in app.selection_units(harm, config, n)]
    out += [(u, small, spec, False, ("valid", "test")) for u in app.trimming_units(harm, config, n)]
    return out, task2


def score(corpus, small, spec, config, wconfig, root, full, choice, units, task2, args, rank_config, archive) -> None:
    from ifutils.experiments.runs import derive_name
    from ifutils.retrain import MODEL_FILE, sentence_losses

    drop = lambda d: {k: v for k, v in d.items() if k != "threads"}  # noqa: E731
    ranks = lambda c: {f"rank_{k}": v for k, v in asdict(c).items()}  # noqa: E731
    name = derive_name("ptb_applications", {**drop(asdict(spec)), **asdict(config), **ranks(rank_config)},
                       {**drop(asdict(RetrainSpec(epochs=spec.epochs))), **asdict(app.ApplicationsConfig()),
                        **ranks(DetectionConfig())})
    out_path = project_path(args.results or f"results/{name}.json")
    records = load_records(root, [u for u, *_ in units], archive)
    eos = corpus.vocab.stoi["<eos>"]

    before = {split: float(np.exp(sentence_losses(full, corpus.splits[split], eos)[1])) for split in ("valid", "test")}
    trim = (app.perplexity_table(records, "trim", config, [None], ["none"])
            + app.perplexity_table(records, "trim", config, config.trim_percents, ["random", *config.methods]))
    select = app.perplexity_table(records, "select", config, config.select_percents, ["random", *config.methods])
    buffer = (app.perplexity_table(records, "buffer", config, [0], ["none"], valid="ptb_valid")
              + app.perplexity_table(records, "buffer", config, config.buffer_sizes,
                                     ["random", *config.buffer_methods], valid="ptb_valid"))
    forget = app.forget_set(config, spec.n_train)
    steps = app.newton_steps(full, small, forget, spec.n_train, wconfig, config.unlearn_dampings, project_path("cache"))
    retrained = {}
    for s in config.seeds:
        if f"unlearn_retrain_s{s}" in records:
            retrained[s], _, _ = load_checkpoint(root / f"unlearn_retrain_s{s}" / MODEL_FILE)
    unlearn = app.unlearning_table(full, small, forget, spec.n_train, steps, retrained, original_seed=0)
    out = {"spec": asdict(spec), "config": asdict(config), "rank_config": asdict(rank_config),
           "whole_network_config": asdict(wconfig),
           "trained_models": len(records), "models": len(units), "full_data_model": {"checkpoint": choice["checkpoint"],
                                                                                       "perplexity": before},
           "trimming": trim, "selection": select, "buffer": buffer, "task2": task2.name,
           "unlearning": unlearn, "environment": environment()}
    app.save_json(out_path, out)
    print(f"full-data model: valid ppl {before['valid']:.1f}, test ppl {before['test']:.1f}")
    for title, rows, level in (("trimming", trim, "percent removed"), ("selection", select, "percent kept"),
                               ("replay buffer (task-1 PTB perplexity after task 2)", buffer, "buffer size")):
        print(f"\n{title}:\n{app.format_perplexity(rows, level)}")
    print(f"\nunlearning {len(forget)} sentences:\n{app.format_unlearning(unlearn)}")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
