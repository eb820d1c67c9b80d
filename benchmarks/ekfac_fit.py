"""EK-FAC fit time and memory of the whole network (``ifutils.curvature.network_kfac.fit_network_kfac``) against
n_fit, on the PTB-size model, with the share of the decoder's V x V output factor.

Command (each n_fit in a fresh subprocess, so that its peak memory is its own):

    IFUTILS_DATA_DIR=../shared/data .venv/bin/python benchmarks/ekfac_fit.py --json benchmarks/results/ekfac_fit.json

Not a 5-minute run on 2 cores: the fit's cost has a part independent of n_fit, the eigendecomposition of the
(V x V) = (10,000 x 10,000) float64 decoder factor G (O(V^3), several minutes on 2 cores), paid once per fit.
``--n-fit 50`` alone is the short run.

Per n_fit (sentences drawn by ``fit_network_kfac`` with ``--seed``, ``labels="model"``, one label draw, chunks of
``--chunk-size``, float32 model, float64 factors):
  1. ``pass 1``: ``fit_network_kfac(..., ekfac=False, cache_dir=tmp)``, the factor sums (timed);
  2. ``ekfac``: ``fit_network_kfac(..., ekfac=True, cache_dir=tmp)``: pass 1 read back from the cache, the
     eigendecomposition of every 2-D factor (inside the library; each ``torch.linalg.eigh`` call is timed by a
     wrapper installed in this benchmark process only, so the decoder's G (V x V) is reported apart), and the EK-FAC
     eigenvalue pass. ``pass 2`` = this call's time minus its eigh time (so it includes reading pass 1 back from the
     cache, under a second); ``total`` = pass 1 + eigh + pass 2, the cost of one EK-FAC fit.
Peak memory: the subprocess's ``ru_maxrss`` (MB) and above its value after the model and data were loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from _common import ROOT, load_model, maxrss_mb


def worker(args) -> dict:
    """One n_fit in this process (module docstring, steps 1-3)."""
    from ifutils.curvature.network_kfac import fit_network_kfac

    torch.set_num_threads(args.threads)
    model, corpus, what = load_model(args.checkpoint, args.seed)
    eos, train = corpus.vocab.stoi["<eos>"], corpus.splits["train"]
    floor = maxrss_mb()
    kw = {"n_fit": args.n_fit, "chunk_size": args.chunk_size, "seed": args.seed, "save_every": 1e9}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        factors = fit_network_kfac(model, train, eos, ekfac=False, cache_dir=tmp, **kw)
        pass1 = time.perf_counter() - start
        factor_bytes = {k: f.numel() * f.element_size() for k, f in factors.factors.items()}
        sizes = {f.shape[0]: k for k, f in factors.factors.items() if f.dim() == 2}
        del factors
        eigh, library_eigh = {}, torch.linalg.eigh

        def timed_eigh(a, *rest, **kw):  # instrument the library's eigendecompositions (this process only)
            start = time.perf_counter()
            out = library_eigh(a, *rest, **kw)
            key = sizes.get(a.shape[0], str(tuple(a.shape)))
            eigh[key] = eigh.get(key, 0.0) + time.perf_counter() - start
            return out

        torch.linalg.eigh = timed_eigh
        try:
            start = time.perf_counter()
            full = fit_network_kfac(model, train, eos, ekfac=True, cache_dir=tmp, **kw)
            second = time.perf_counter() - start
        finally:
            torch.linalg.eigh = library_eigh
        held = full.nbytes + sum(v[1].numel() * 8 for v in full.eigenbases().values() if v[1] is not None)
    eigh_total = sum(eigh.values())
    pass2 = max(second - eigh_total, 0.0)
    dec = factor_bytes["G.decoder"]
    return {"n_fit": args.n_fit, "model": what, "threads": args.threads, "tokens": full.tokens,
            "pass1_s": pass1, "eigh_s": eigh_total, "eigh_decoder_s": eigh["G.decoder"], "pass2_s": pass2,
            "ekfac_call_s": second, "total_s": pass1 + eigh_total + pass2,
            "decoder_share_time": (eigh["G.decoder"]) / (pass1 + eigh_total + pass2),
            "held_mb": held / 2**20, "decoder_factor_and_basis_mb": 2 * dec / 2**20,
            "decoder_share_memory": 2 * dec / held, "peak_mb": maxrss_mb(), "floor_mb": floor, "eigh": eigh}


def write_json(args, argv, rows: list[dict]) -> None:
    """Write the settings, environment and rows so far to ``--json`` (atomically)."""
    from ifutils.io import atomic_write, environment, project_path

    result = {"command": " ".join(["benchmarks/ekfac_fit.py", *(argv if argv is not None else sys.argv[1:])]),
              "settings": vars(args), "environment": environment(), "rows": rows}
    atomic_write(project_path(args.json), lambda tmp: tmp.write_text(json.dumps(result, indent=1)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-fit", type=int, nargs="+", default=[50, 100, 200, 400], dest="n_fits")
    parser.add_argument("--checkpoint", default="checkpoints/ptb_lstm.pt")
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", type=int, default=None, dest="n_fit", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.n_fit:
        print(json.dumps(worker(args)))
        return 0
    if min(args.n_fits + [args.chunk_size, args.threads]) < 1:
        parser.error("n_fit, --chunk-size and --threads must be >= 1")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows = []
    for n in args.n_fits:
        cmd = [sys.executable, __file__, "--worker", str(n), "--checkpoint", args.checkpoint or "", "--chunk-size",
               str(args.chunk_size), "--threads", str(args.threads), "--seed", str(args.seed)]
        done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"n_fit={n} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"n_fit={n}: {rows[-1]['total_s']:.1f} s", file=sys.stderr)
        if args.json:  # after every n_fit, so that a stopped run keeps its finished rows
            write_json(args, argv, rows)
    base = rows[0]
    print(f"{'n_fit':>5s} {'tokens':>7s} {'pass 1 s':>8s} {'eigh s':>7s} {'G_dec eigh s':>12s} {'pass 2 s':>8s} "
          f"{'total s':>8s} {'x first':>7s} {'G_dec time %':>12s} {'held MB':>8s} {'G_dec mem %':>11s} "
          f"{'peak MB':>8s} {'above floor':>11s}")
    for r in rows:
        print(f"{r['n_fit']:5d} {r['tokens']:7d} {r['pass1_s']:8.1f} {r['eigh_s']:7.1f} {r['eigh_decoder_s']:12.1f} "
              f"{r['pass2_s']:8.1f} {r['total_s']:8.1f} {r['total_s'] / base['total_s']:7.2f} "
              f"{100 * r['decoder_share_time']:12.1f} {r['held_mb']:8.0f} {100 * r['decoder_share_memory']:11.1f} "
              f"{r['peak_mb']:8.0f} {r['peak_mb'] - r['floor_mb']:11.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
