"""Whole-network curvature spectrum statistics of the PTB LSTM across widths (Karakida, Akaho, Amari 2019).

For each width M (embedding = hidden = M) and state ("init": the seeded initialisation that training starts
from; "trained": checkpoints/ptb_lstm_h{M}.pt, or checkpoints/ptb_lstm.pt for M = 256 when its configuration
is the family's), computes m = tr(C)/P, s = tr(C^2)/P and lambda_max of the true Fisher (F = GGN), the Hessian
(H) and the sentence-level empirical Fisher (EF) on n seeded training sentences (ifutils.curvature.estimators). Every
finished (width, state, curvature) is written to the results JSON at once, so a rerun resumes; then the
scaling figure is drawn. Trained checkpoints come from experiments/train_family.sh.

    IFUTILS_DATA_DIR=../shared/data .venv/bin/python experiments/spectrum.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ifutils.curvature.estimators import CURVATURES
from ifutils.data import load_corpus
from ifutils.experiments.plots import spectrum_scaling
from ifutils.experiments.spectrum import spectrum_stats
from ifutils.io import environment, load_checkpoint, project_path, update_results
from ifutils.model import LSTMLM, ModelConfig

FAMILY_TRAIN = {"batch_size": 32, "lr": 2e-3, "clip": 1.0, "seed": 0, "max_train_sentences": None}  # = main model's


def family_config(vocab_size: int, width: int) -> ModelConfig:
    return ModelConfig(vocab_size, width, width, 1, 0.25)


def trained_checkpoint(width: int, vocab_size: int) -> Path | None:
    """checkpoints/ptb_lstm_h{M}.pt, else the main checkpoint when it is the family's width-M model."""
    path = project_path(f"checkpoints/ptb_lstm_h{width}.pt")
    if path.is_file():
        return path
    main = project_path("checkpoints/ptb_lstm.pt")
    if main.is_file():
        payload = torch.load(main, map_location="cpu", weights_only=True)
        train = {k: v for k, v in payload["train_config"].items() if k in FAMILY_TRAIN}
        if payload["model_config"] == family_config(vocab_size, width).to_dict() and train == FAMILY_TRAIN:
            return main
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--curvatures", nargs="+", default=list(CURVATURES), choices=CURVATURES)
    parser.add_argument("--states", nargs="+", default=["init", "trained"], choices=["init", "trained"])
    parser.add_argument("--n", type=int, default=32, help="training sentences in the objective (seeded choice)")
    parser.add_argument("--probes", type=int, default=8, help="Rademacher probes for m and s")
    parser.add_argument("--max-matvecs", type=int, default=25, help="Lanczos budget for lambda_max")
    parser.add_argument("--tol", type=float, default=1e-3, help="Lanczos relative tolerance")
    parser.add_argument("--seed", type=int, default=0, help="sentences, probes, Lanczos start, init weights")
    parser.add_argument("--out", default="results/spectrum.json")
    parser.add_argument("--figure", default="figures/ptb_spectrum_scaling.png")
    args = parser.parse_args()
    out, figure = project_path(args.out), project_path(args.figure)

    corpus = load_corpus("ptb")
    vocab_size, eos_id = len(corpus.vocab), corpus.vocab.stoi["<eos>"]
    train = corpus.splits["train"]
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: args.n].tolist()
    sentences = [train[i] for i in chosen]
    settings = {"dataset": "ptb", "n": args.n, "tokens": sum(len(s) for s in sentences), "sentence_ids": chosen,
                "probes": args.probes, "max_matvecs": args.max_matvecs, "tol": args.tol, "seed": args.seed,
                "objective": "(1/n) sum_i mean token NLL of sentence i (nats)", "parameters": "all"}
    results = json.loads(out.read_text()) if out.is_file() else {}
    if results.get("settings", settings) != settings:
        sys.exit(f"{out} holds results for other settings; delete it or pass --out to start another file")
    update_results(out, "settings", settings)
    update_results(out, "environment", environment())
    entries = results.get("entries", {})

    for width in args.widths:
        for state in args.states:
            if state == "init":
                torch.manual_seed(args.seed)  # as train_language_model does, so "init" is the trained run's start
                model, source = LSTMLM(family_config(vocab_size, width)).eval(), {"init_seed": args.seed}
            else:
                path = trained_checkpoint(width, vocab_size)
                if path is None:
                    print(f"width {width}: no trained checkpoint (run experiments/train_family.sh); skipped")
                    continue
                model, vocab, payload = load_checkpoint(path)
                if vocab.itos != corpus.vocab.itos:
                    sys.exit(f"{path} has another vocabulary than PTB's train split")
                source = {"checkpoint": str(path.relative_to(project_path("."))), "epochs": len(payload["history"]),
                          "valid_ppl": payload["history"][-1]["valid_ppl"]}
            for curvature in args.curvatures:
                key = f"h{width}/{state}/{curvature}"
                if entries.get(key, {}).get("source") == source:
                    continue
                start = time.perf_counter()
                stats = spectrum_stats(model, sentences, eos_id, (curvature,), probes=args.probes, tol=args.tol,
                                       max_matvecs=args.max_matvecs, seed=args.seed)[curvature]
                entries[key] = {"width": width, "state": state, "curvature": curvature, "source": source, **stats}
                update_results(out, "entries", entries)
                print(f"{key}: P={stats['P']:,} m={stats['mean']:.3e}+-{stats['mean_se']:.1e} "
                      f"s={stats['second_moment']:.3e}+-{stats['second_moment_se']:.1e} "
                      f"lambda_max={stats['lambda_max']:.3e} (converged {stats['lanczos_converged']}, "
                      f"{stats['lanczos_matvecs']} products), {time.perf_counter() - start:.0f} s", flush=True)
    spectrum_scaling(list(entries.values()), "PTB", figure)
    print(f"wrote {out} and {figure}")


if __name__ == "__main__":
    main()
