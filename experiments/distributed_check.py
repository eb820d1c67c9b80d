"""Whole-network KFAC/EK-FAC and diagonal Fisher fits and streamed scoring, sharded over torchrun processes.

On a small seeded LSTM LM (random initialisation, random sentences; nothing is downloaded) every rank fits its slice
of the chunks (ifutils.curvature.network_kfac, sums all-reduced) and scores its chunks (ifutils.scoring.score_all,
rows gathered to rank 0). Rank 0 writes into --out:

* problem.pt: the model (config and state dict), the sentences, the queries and the settings, so that anyone can
  recompute the same things in one process (tests/test_distributed.py does);
* factors_<labels>.pt: {"factors", "eigenvalues", "n", "tokens"} of fit_network_kfac (float64, CPU);
* diagonal_<labels>.pt: the (P,) diagonal Fisher (float64);
* scores/: score_all's files (scores.npy, config.json, order.npy, progress.json) of the queries
  q_j = (EK-FAC + 0.1 x mean eigenvalue per layer)^-1 g_test_j of --queries held-out sentences;
* scores_interrupted/ (with --interrupt-after K): the same scoring stopped on every rank after K chunks, as a kill
  would leave it, for a resume by any number of processes;
* summary.json: world size, backend, device, seconds per stage and, with --reference, the largest relative
  difference of each result from rank 0's single-process recomputation (distributed=False).

    torchrun --standalone --nproc_per_node=2 experiments/distributed_check.py --out runs/dist_check
    torchrun --standalone --nproc_per_node=2 experiments/distributed_check.py --out runs/dist_check --reference

On CUDA (--device cuda, one GPU per process) the backend is NCCL; on CPU gloo. A single process (plain python) runs
the same code unsharded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ifutils import distributed as dist_utils
from ifutils.curvature.network_kfac import (
    diagonal_fisher,
    ekfac_network_curvature,
    fit_network_kfac,
)
from ifutils.io import atomic_write
from ifutils.model import LSTMLM, ModelConfig
from ifutils.network import NetworkGrads
from ifutils.scoring import score_all

EOS = 0


class Interrupted(Exception):
    """Raised on every rank by the interrupted scoring's on_chunk, like a kill after K recorded chunks."""


def random_sentences(n: int, vocab: int, max_len: int, generator: torch.Generator) -> list[torch.Tensor]:
    """n sentences of 1..max_len words from ids 1..vocab-1, each ending in <eos> (id 0), int64."""
    lengths = torch.randint(1, max_len + 1, (n,), generator=generator)
    return [torch.cat([torch.randint(1, vocab, (int(k),), generator=generator), torch.tensor([EOS])])
            for k in lengths]


def build_problem(args) -> dict:
    """The seeded model config and state, training and held-out sentences (the same on every rank)."""
    torch.manual_seed(args.seed)
    config = ModelConfig(args.vocab, args.emb, args.hidden, args.layers, dropout=0.0)
    model = LSTMLM(config).to(getattr(torch, args.dtype)).eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    train = random_sentences(args.n_sentences, args.vocab, args.max_len, g)
    test = random_sentences(args.queries, args.vocab, args.max_len, g)
    return {"model_config": config.to_dict(), "state_dict": model.state_dict(), "train": train, "test": test}


def load_model(problem: dict, device) -> LSTMLM:
    """The problem's LSTMLM in eval mode on ``device``."""
    state = problem["state_dict"]
    model = LSTMLM(ModelConfig(**problem["model_config"])).to(next(iter(state.values())).dtype)
    model.load_state_dict(state)
    return model.to(device).eval()


def save(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def make_queries(factors, g_test: torch.Tensor) -> torch.Tensor:
    """(Q, P) float64 q_j = (EK-FAC + 0.1 x each layer's mean eigenvalue)^-1 g_test_j, g_test (Q, P)."""
    ekfac = ekfac_network_curvature(factors)
    return ekfac.solve(g_test.T, ekfac.relative_damping(0.1)).T


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    a, b = torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu()
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the results (written by rank 0)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA (NCCL, cuda:LOCAL_RANK) when available, else CPU (gloo)")
    parser.add_argument("--vocab", type=int, default=50)
    parser.add_argument("--emb", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--n-sentences", type=int, default=64, help="training sentences fitted and scored")
    parser.add_argument("--max-len", type=int, default=12, help="words per sentence at most (before <eos>)")
    parser.add_argument("--queries", type=int, default=3, help="held-out sentences, one query each")
    parser.add_argument("--chunk-size", type=int, default=4, help="sentences per chunk of the fits and the scoring")
    parser.add_argument("--labels", nargs="+", choices=["model", "data"], default=["model", "data"])
    parser.add_argument("--mc-samples", type=int, default=2, help="label draws of the true Fisher")
    parser.add_argument("--method", choices=["grads", "forward"], default="grads", help="score_all's method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="cache of the fits (shared by the ranks); default none")
    parser.add_argument("--interrupt-after", type=int, default=0,
                        help="also score into scores_interrupted/, stopped after this many chunks (0: not)")
    parser.add_argument("--reference", action="store_true",
                        help="rank 0 also recomputes everything in one process and reports the differences")
    args = parser.parse_args()
    for name in ("vocab", "emb", "hidden", "layers", "n_sentences", "max_len", "queries", "chunk_size", "mc_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.vocab < 2:
        parser.error("--vocab must be >= 2 (<eos> and one word)")
    if args.interrupt_after < 0:
        parser.error("--interrupt-after must be >= 0")

    ctx = dist_utils.init(None if args.device == "auto" else args.device)
    out = Path(args.out)
    problem = build_problem(args)
    model = load_model(problem, ctx.device)
    train = problem["train"]
    fit_kwargs = {"mc_samples": args.mc_samples, "chunk_size": args.chunk_size, "seed": args.seed,
                  "cache_dir": args.cache_dir}
    seconds: dict[str, float] = {}
    results: dict[str, object] = {}

    def timed(stage, fn):
        dist_utils.barrier()
        start = time.perf_counter()
        value = fn()
        dist_utils.barrier()
        seconds[stage] = round(time.perf_counter() - start, 3)
        return value

    fits = {}
    for labels in args.labels:
        fits[labels] = timed(f"kfac_ekfac_{labels}",
                             lambda lab=labels: fit_network_kfac(model, train, EOS, labels=lab, **fit_kwargs))
        d = timed(f"diagonal_{labels}",
                  lambda lab=labels: diagonal_fisher(model, train, EOS, labels=lab, **fit_kwargs))
        f = fits[labels]
        results[f"factors_{labels}"] = {"factors": f.factors, "eigenvalues": f.eigenvalues, "n": f.n,
                                        "tokens": f.tokens}
        results[f"diagonal_{labels}"] = d.d

    g_test = NetworkGrads(model, EOS).flat(problem["test"]).detach().cpu().double()  # (Q, P)
    queries = make_queries(fits[args.labels[0]], g_test).to(next(model.parameters()).dtype)
    problem["queries"] = queries
    problem["settings"] = {**vars(args), "eos_id": EOS}
    score_kwargs = {"chunk_size": args.chunk_size, "method": args.method, "dtype": "float64"}
    timed("score_all", lambda: score_all(model, train, EOS, queries, out / "scores", **score_kwargs))
    if args.interrupt_after:
        def stop(chunk, finished):
            if finished >= args.interrupt_after:
                raise Interrupted

        try:
            score_all(model, train, EOS, queries, out / "scores_interrupted", on_chunk=stop, **score_kwargs)
        except Interrupted:
            pass
    if ctx.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save(out / "problem.pt", problem)
        for key, value in results.items():
            save(out / f"{key}.pt", value)
    summary = {"world": ctx.world, "backend": ctx.backend, "device": str(ctx.device), "seconds": seconds,
               "n_sentences": len(train), "parameters": int(sum(p.numel() for p in model.parameters()))}
    if args.reference and ctx.rank == 0:
        summary["max_relative_difference"] = reference_differences(model, train, g_test, queries, results, args,
                                                                   out, fit_kwargs, score_kwargs)
    dist_utils.barrier()
    if ctx.rank == 0:
        atomic_write(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))
        print(json.dumps(summary, indent=1))
    dist_utils.finalize()


def reference_differences(model, train, g_test, queries, results, args, out, fit_kwargs, score_kwargs) -> dict:
    """{result: max relative difference} of the sharded results from one process's (distributed=False): the raw
    factors and diagonals, the EK-FAC eigenvalues (basis-dependent: a factor with a repeated eigenvalue may rotate
    its basis at rounding level), the EK-FAC-preconditioned queries (basis-free) and the scores."""
    diffs = {}
    kwargs = {**fit_kwargs, "cache_dir": None, "distributed": False}
    for labels in args.labels:
        f = fit_network_kfac(model, train, EOS, labels=labels, **kwargs)
        got = results[f"factors_{labels}"]
        diffs[f"factors_{labels}"] = max(max_rel(got["factors"][k], v) for k, v in f.factors.items())
        diffs[f"eigenvalues_{labels}"] = max(max_rel(got["eigenvalues"][k], v) for k, v in f.eigenvalues.items())
        if labels == args.labels[0]:
            diffs["queries"] = max_rel(queries, make_queries(f, g_test))
        d = diagonal_fisher(model, train, EOS, labels=labels, **kwargs)
        diffs[f"diagonal_{labels}"] = max_rel(results[f"diagonal_{labels}"], d.d)
    single = score_all(model, train, EOS, queries, out / "reference_scores", distributed=False, **score_kwargs)
    sharded = np.load(out / "scores" / "scores.npy")
    diffs["scores"] = max_rel(torch.from_numpy(np.array(sharded)), torch.from_numpy(np.array(single)))
    return diffs


if __name__ == "__main__":
    main()
