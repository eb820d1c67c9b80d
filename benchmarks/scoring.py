"""Scoring training sentences against fixed queries: forward mode against per-sample-gradient scoring
(``ifutils.scoring.score_all``, ``method="forward"`` vs ``method="grads"``), and the time and peak memory of scoring
all 42,068 PTB training sentences against 101 queries, extrapolated from a measured prefix.

Default run (about 5 minutes on 2 idle CPU cores):

    IFUTILS_DATA_DIR=../shared/data .venv/bin/python benchmarks/scoring.py --json benchmarks/results/scoring.json

Setting: the PTB-size model (``--checkpoint``, default ``checkpoints/ptb_lstm.pt`` when present, else a random
init of V = 10,000, E = H = 256), all P = 5,656,592 parameters, float32, ``--threads`` threads. The queries are
Q random (Q, P) vectors (seeded normal, scaled by 1 / sqrt(P)): the cost of g_i^T q_j does not depend on what q_j
is, so no curvature solve is needed to time it (the real run uses q_j = (C + lambda I)^-1 g_test_j).

1. ``--sentences`` random training sentences, scored by each method for Q in ``--queries`` through
   ``score_all`` (files in a temporary directory, chunks of ``--chunk-size``); seconds, sentences/s, the ratio
   forward / grads, and max |score_forward - score_grads| / max |score_grads|. Forward mode is timed up to
   ``--forward-max`` queries (default 11); above that its row is an ESTIMATE, linear in Q (one jvp pass per query),
   marked ``*``.
2. The full-set estimate: a fresh subprocess scores a random ``--prefix`` of the training sentences against
   ``--full-queries`` queries (101: the validation query plus 100 test queries) with ``--full-method`` (default:
   whichever method was faster at the largest Q of part 1); its time is scaled to all training sentences by their
   padded-token count (the cost of a chunk is linear in its padded tokens): an EXTRAPOLATION, stated in the table.
   Peak memory is that subprocess's ``ru_maxrss`` (MB), measured, not extrapolated: score_all's memory does not grow
   with n (one chunk plus the queries; the scores live on disk).
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

N_TRAIN = 42_068


def setup(args):
    """(model, eos id, training sentences, description of the model)."""
    model, corpus, what = load_model(args.checkpoint, args.seed)
    return model, corpus.vocab.stoi["<eos>"], corpus.splits["train"], what


def queries(model, q: int, seed: int) -> torch.Tensor:
    """(q, P) seeded normal query vectors / sqrt(P)."""
    p = sum(t.numel() for t in model.parameters())
    return torch.randn(q, p, generator=torch.Generator().manual_seed(seed)).div_(p**0.5)  # in place: one (q, P)


def sample(sentences, n: int, seed: int) -> list[torch.Tensor]:
    """n training sentences drawn without replacement (seeded)."""
    pick = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return [sentences[i] for i in pick]


def padded_tokens(sentences, chunk_size: int) -> int:
    """Padded tokens of score_all's length-sorted chunks: sum over chunks of (size x longest)."""
    lengths = sorted(len(s) for s in sentences)
    return sum(len(c) * c[-1] for c in (lengths[i : i + chunk_size] for i in range(0, len(lengths), chunk_size)))


def timed_scores(model, eos_id, sentences, qs, method, chunk_size, query_block):
    """(scores (n, Q) numpy, seconds) of one fresh score_all run in a temporary directory."""
    from ifutils.scoring import score_all

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out = score_all(model, sentences, eos_id, qs, tmp, chunk_size=chunk_size, method=method,
                        query_block=query_block, show_progress=False)
        seconds = time.perf_counter() - start
        return out.copy(), seconds


def full_worker(args) -> dict:
    """Part 2 in this (fresh) process: score the prefix, return time, padded tokens and peak memory."""
    torch.set_num_threads(args.threads)
    model, eos_id, train, what = setup(args)
    prefix = sample(train, args.prefix, args.seed + 1)
    from ifutils.experiments.whole_network import _peak_mib, _reset_peak
    from ifutils.scoring import query_dict

    qs = query_dict(model, queries(model, args.full_queries, args.seed + 2))  # one per-tensor copy held
    floor = maxrss_mb()
    reset = _reset_peak()  # Linux: the peak below is the scoring's own (queries included), not the set-up's
    _, seconds = timed_scores(model, eos_id, prefix, qs, args.full_method, args.chunk_size, args.query_block)
    scoring_peak = _peak_mib() if reset else None
    full = padded_tokens(train, args.chunk_size)
    part = padded_tokens(prefix, args.chunk_size)
    return {"method": args.full_method, "queries": args.full_queries, "prefix": len(prefix), "seconds": seconds,
            "prefix_padded_tokens": part, "all_padded_tokens": full, "n_train": len(train),
            "extrapolated_seconds": seconds * full / part, "peak_mb": maxrss_mb(),
            "floor_mb": floor, "scoring_peak_mb": scoring_peak, "model": what}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="checkpoints/ptb_lstm.pt")
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 11, 101])
    parser.add_argument("--prefix", type=int, default=300, help="sentences scored for the full-set extrapolation")
    parser.add_argument("--full-queries", type=int, default=101)
    parser.add_argument("--full-method", choices=("grads", "forward"), default=None)
    parser.add_argument("--forward-max", type=int, default=11, help="time forward mode only up to this Q; above "
                        "it the row is an estimate, linear in Q from the largest Q timed (one jvp pass per query)")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--query-block", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-compare", action="store_true", help="only part 2")
    parser.add_argument("--json", default=None)
    parser.add_argument("--full-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.full_worker:
        print(json.dumps(full_worker(args)))
        return 0
    if min(args.queries + [args.sentences, args.prefix, args.full_queries, args.chunk_size, args.threads]) < 1:
        parser.error("counts must be >= 1")
    torch.set_num_threads(args.threads)
    rows = []
    if not args.skip_compare:
        model, eos_id, train, what = setup(args)
        few = sample(train, args.sentences, args.seed)
        print(f"part 1: {len(few)} random training sentences, {what}, {args.threads} threads, chunks of "
              f"{args.chunk_size}", file=sys.stderr)
        for q in args.queries:
            qs = queries(model, q, args.seed + 2)
            got = {}
            for method in ("grads", "forward"):
                if method == "forward" and q > args.forward_max:
                    # one jvp pass per query: linear in Q; stated as an estimate from the largest Q measured
                    ref = max((r for r in rows if r["method"] == "forward"), key=lambda r: r["queries"], default=None)
                    if ref is not None:
                        est = ref["seconds"] * q / ref["queries"]
                        rows.append({"queries": q, "method": "forward", "seconds": est, "estimated": True,
                                     "sentences_per_s": len(few) / est})
                    continue
                got[method], seconds = timed_scores(model, eos_id, few, qs, method, args.chunk_size, args.query_block)
                rows.append({"queries": q, "method": method, "seconds": seconds, "sentences_per_s": len(few) / seconds})
                print(f"Q={q:4d} {method:8s} {seconds:8.1f} s", file=sys.stderr)
            if "forward" in got:
                rows[-1]["max_rel_diff"] = float(abs(got["forward"] - got["grads"]).max() / abs(got["grads"]).max())
        del model
    method = args.full_method
    if method is None:
        last = [r for r in rows if r["queries"] == max(args.queries)] if rows else []
        method = min(last, key=lambda r: r["seconds"])["method"] if last else "grads"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, __file__, "--full-worker", "--full-method", method, *[
        a for k, v in (("--checkpoint", args.checkpoint), ("--prefix", args.prefix), ("--full-queries",
        args.full_queries), ("--chunk-size", args.chunk_size), ("--query-block", args.query_block), ("--threads",
        args.threads), ("--seed", args.seed)) for a in (k, str(v))]]
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"the full-set worker failed:\n{done.stderr[-3000:]}")
    full = json.loads(done.stdout.strip().splitlines()[-1])

    print(f"{'Q':>4s} {'method':8s} {'seconds':>8s} {'sent/s':>8s} {'forward/grads time':>18s} {'max rel diff':>12s}")
    for r in rows:
        other = next(o for o in rows if o["queries"] == r["queries"] and o["method"] == "grads")
        ratio = f"{r['seconds'] / other['seconds']:18.2f}" if r["method"] == "forward" else f"{'1.00':>18s}"
        if r.get("estimated"):
            ratio = ratio[:-1] + "*"
        diff = f"{r['max_rel_diff']:12.1e}" if "max_rel_diff" in r else f"{'-':>12s}"
        print(f"{r['queries']:4d} {r['method']:8s} {r['seconds']:8.1f} {r['sentences_per_s']:8.1f} {ratio} {diff}")
    if any(r.get("estimated") for r in rows):
        print("* estimated, not timed: forward mode costs one jvp pass per query, so its time is linear in Q; scaled "
              f"from the largest Q timed (--forward-max {args.forward_max})")
    if full["prefix"] == full["n_train"]:
        print(f"all {full['n_train']} training sentences x {full['queries']} queries ({full['method']}, {full['model']}): "
              f"{full['seconds']:.1f} s ({full['seconds'] / 60:.1f} min) MEASURED on every sentence; peak memory of the "
              f"scoring (queries included) {full['scoring_peak_mb'] or full['peak_mb']:.0f} MB "
              f"({(full['scoring_peak_mb'] or full['peak_mb']) / 1024:.2f} GiB)")
    else:
        print(f"all {full['n_train']} training sentences x {full['queries']} queries ({full['method']}, "
              f"{full['model']}): {full['seconds']:.1f} s measured on {full['prefix']} random sentences, EXTRAPOLATED "
              f"by padded tokens ({full['all_padded_tokens']} / {full['prefix_padded_tokens']}) to "
              f"{full['extrapolated_seconds'] / 60:.1f} min; peak memory {full['peak_mb']:.0f} MB measured "
              f"({full['peak_mb'] / 1024:.2f} GiB; {full['floor_mb']:.0f} MB before scoring)")
    if args.json:
        from ifutils.io import atomic_write, environment, project_path

        result = {"command": " ".join(["benchmarks/scoring.py", *(argv if argv is not None else sys.argv[1:])]),
                  "settings": vars(args), "environment": environment(), "compare": rows, "full": full}
        atomic_write(project_path(args.json), lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
