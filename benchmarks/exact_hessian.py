"""Time to build the exact p x p Hessian of the subset training loss: naive HVP columns vs the structured pass.

Full run (default PTB setting; about 30 minutes on 2 CPU cores, the naive route extrapolated from 16 columns):

    IFUTILS_DATA_DIR=../shared/data .venv/bin/python benchmarks/exact_hessian.py --columns 16 --json benchmarks/results/exact_hessian.json

Setting: the trained checkpoint, the default recurrent subset (p = 512 coordinates of the last weight_hh), the
n_H = 500 training sentences that ``fisher_if.ipynb`` uses (``ifutils.experiments.comparison.choose_samples``), in float32 and
float64. In one run, per dtype:
  * ``naive``: H column by column, ``ifutils.curvature.inverse.hvp_operator`` (forward-over-reverse through the
    10,000-way softmax for every column) applied to blocks of identity columns, one row per ``--column-blocks``
    size (1: the literal column-by-column build; 16: 16 columns vmapped per pass, a tuned baseline). With
    ``--columns N`` only the first N columns are built and the time is extrapolated linearly to p: columns are
    independent, so the cost is linear in their number. The table says which.
  * ``structured``: ``ifutils.curvature.hessian_and_ggn`` (H and the GGN in one pass).
  * the agreement max |H_naive - H_structured| / max |H_structured| over the columns built.
  * a reference rate: the best of ``--repeats`` GEMMs of ``--gemm-size`` square matrices.
FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on one chunk of median padded size (for the naive
route, one block of columns on that chunk), scaled by total padded tokens / the chunk's (and p / block): an
estimate, because the counter's overhead would distort a timed full pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from ifutils.curvature import hessian_and_ggn
from ifutils.curvature.inverse import hvp_operator
from ifutils.data import bucket_batches, load_corpus
from ifutils.experiments.comparison import InfluenceConfig, choose_samples
from ifutils.io import (
    atomic_write,
    check_corpus,
    environment,
    load_checkpoint,
    project_path,
)
from ifutils.subset import SubsetLoss, default_subset


def gemm_rate(dtype: torch.dtype, size: int, repeats: int) -> float:
    """FLOP/s of a (size x size) @ (size x size) product: 2 size^3 FLOPs over the best of ``repeats`` runs."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=g, dtype=dtype) for _ in range(2))
    a @ b  # warm-up: thread pool and allocator
    best = min(timed(lambda: a @ b)[1] for _ in range(repeats))
    return 2 * size**3 / best


def timed(fn):
    """(fn(), wall seconds)."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def flops(fn) -> int:
    """FLOPs of fn() as counted by FlopCounterMode (matrix products and convolutions)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def median_chunk(sentences: list[torch.Tensor], chunk_size: int) -> tuple[list[torch.Tensor], float]:
    """The chunk of median padded size (as ``SubsetLoss.batches`` cuts them) and total / its padded tokens."""
    lengths = [len(s) for s in sentences]
    chunks = bucket_batches(lengths, chunk_size)
    padded = [len(idx) * max(lengths[i] for i in idx) for idx in chunks]
    order = sorted(range(len(chunks)), key=padded.__getitem__)
    middle = order[len(order) // 2]
    return [sentences[i] for i in chunks[middle]], sum(padded) / padded[middle]


def naive_columns(loss: SubsetLoss, sentences: list[torch.Tensor], columns: int, block: int, chunk_size: int,
                  desc: str) -> torch.Tensor:
    """(p, columns) float64: the first ``columns`` columns of H, as hvp_operator(identity blocks)."""
    p = len(loss.theta0)
    mv = hvp_operator(loss, sentences, chunk_size)
    out = torch.empty(p, columns, dtype=torch.float64)
    for start in tqdm(range(0, columns, block), desc=desc, leave=False):
        stop = min(start + block, columns)
        eye = torch.zeros(p, stop - start, dtype=torch.float64)
        eye[torch.arange(start, stop), torch.arange(stop - start)] = 1.0
        out[:, start:stop] = mv(eye).cpu()
    return out


def measure(model, subset, eos: int, sentences: list[torch.Tensor], dtype: torch.dtype, args) -> list[dict]:
    """The naive and structured rows of the table for one dtype."""
    loss = SubsetLoss(model, subset, eos, dtype)
    p = len(loss.theta0)
    columns = min(args.columns or p, p)
    # Counted first: the one-time set-up of torch.func's forward mode then stays out of the timings.
    chunk, token_scale = median_chunk(sentences, args.chunk_size)
    flops_s = flops(lambda: hessian_and_ggn(loss, chunk, args.chunk_size)) * token_scale
    structured, seconds_s = timed(lambda: hessian_and_ggn(loss, sentences, args.chunk_size)[0].matrix)
    name = str(dtype).removeprefix("torch.")
    rows = []
    timing = "measured" if columns == p else f"extrapolated from {columns}/{p} columns"
    for block in sorted({min(b, columns) for b in args.column_blocks}):
        flops_n = flops(lambda: hvp_operator(loss, chunk, args.chunk_size)(torch.eye(p, block, dtype=torch.float64)))
        flops_n *= token_scale * p / block
        naive, seconds_n = timed(lambda: naive_columns(loss, sentences, columns, block, args.chunk_size,
                                                       f"naive columns, block {block} ({dtype})"))
        seconds_n_full = seconds_n * p / columns
        agreement = float((naive - structured[:, :columns]).abs().max() / structured.abs().max())
        rows.append({"dtype": name, "method": f"naive/{block}", "seconds": seconds_n_full, "timing": timing,
                     "ratio": seconds_n_full / seconds_s, "gflop": flops_n / 1e9, "agreement": agreement})
    return rows + [{"dtype": name, "method": "structured", "seconds": seconds_s, "timing": "measured", "ratio": 1.0,
                    "gflop": flops_s / 1e9, "agreement": None}]


def print_table(rows: list[dict]) -> None:
    head = (f"{'dtype':8s} {'method':10s} {'seconds':>9s} {'timing':38s} {'naive/str.':>11s} {'GFLOP':>9s} "
            f"{'GFLOP/s':>8s} {'% GEMM':>7s} {'max|dH|/max|H|':>15s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        agree = "-" if r["agreement"] is None else f"{r['agreement']:.2e}"
        print(f"{r['dtype']:8s} {r['method']:10s} {r['seconds']:9.1f} {r['timing']:38s} {r['ratio']:11.1f} "
              f"{r['gflop']:9.1f} {r['gflops_per_s']:8.2f} {r['percent_of_gemm']:7.1f} {agree:>15s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/ptb_lstm.pt", help="trained PTB checkpoint")
    parser.add_argument("--subset", default="recurrent", help="parameter subset kind (ifutils.subset.default_subset)")
    parser.add_argument("--num-coords", type=int, default=512, help="p, coordinates of the subset")
    parser.add_argument("--n-hessian", type=int, default=500, help="n_H, training sentences of the loss")
    parser.add_argument("--seed", type=int, default=0, help="seed of sentence and coordinate choice")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--chunk-size", type=int, default=8, help="sentences per vectorised chunk (both methods)")
    parser.add_argument("--column-blocks", type=int, nargs="+", default=[1, 16],
                        help="identity columns per naive HVP call; one naive row each (1 = one column at a time)")
    parser.add_argument("--columns", type=int, default=None,
                        help="build only the first N naive columns and extrapolate to p (default: all p)")
    parser.add_argument("--gemm-size", type=int, default=2048, help="side of the reference GEMM")
    parser.add_argument("--repeats", type=int, default=3, help="GEMM repeats (best is kept)")
    parser.add_argument("--json", default=None, help="also write the table and settings to this JSON file")
    args = parser.parse_args()
    if (args.columns is not None and args.columns < 1) or min(args.column_blocks) < 1:
        parser.error("--columns and --column-blocks must be >= 1")
    checkpoint = project_path(args.checkpoint)
    if not checkpoint.is_file():
        sys.exit(f"no checkpoint at {checkpoint}: train one with train_lstm_penn_treebank.ipynb "
                 f"(IFUTILS_DATA_DIR=../shared/data bash scripts/main.sh) or pass --checkpoint PATH")
    model, vocab, payload = load_checkpoint(checkpoint)
    corpus = load_corpus("ptb", vocab=vocab)
    check_corpus(payload, corpus)
    config = InfluenceConfig(subset=args.subset, num_coords=args.num_coords, n_hessian=args.n_hessian,
                             n_train=max(InfluenceConfig.n_train, args.n_hessian), seed=args.seed)
    sentences = choose_samples(corpus, config)["hessian"]
    subset = default_subset(model, args.subset, args.num_coords, args.seed)
    print(f"{checkpoint.name}: {args.subset} subset, p={subset.size}, n_H={len(sentences)} sentences "
          f"({sum(len(s) for s in sentences):,} tokens), V={model.config.vocab_size:,}, "
          f"torch threads {torch.get_num_threads()}")
    rows = []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        rate = gemm_rate(dtype, args.gemm_size, args.repeats)
        print(f"{name}: reference GEMM {args.gemm_size}^3 at {rate / 1e9:.1f} GFLOP/s")
        for row in measure(model, subset, vocab.stoi["<eos>"], sentences, dtype, args):
            row["gflops_per_s"] = row["gflop"] / row["seconds"]
            row["percent_of_gemm"] = 100 * row["gflops_per_s"] * 1e9 / rate
            row["gemm_gflops_per_s"] = rate / 1e9
            rows.append(row)
    print("FLOPs: FlopCounterMode on one chunk of median padded size (naive: one column block), scaled to the "
          "whole pass")
    print_table(rows)
    if args.json:
        result = {"settings": vars(args), "environment": environment(), "rows": rows}
        path = atomic_write(project_path(args.json), lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
