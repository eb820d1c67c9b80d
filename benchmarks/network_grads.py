"""Whole-network per-sample gradients: ``ifutils.network.NetworkGrads`` against a loop of ``torch.autograd.grad``
and against opacus's ``DPLSTM`` per-sample gradients, at several batch sizes and thread counts.

Default run (about 4-5 minutes on 2 CPU cores; each method in a fresh subprocess, so that its peak memory is its own):

    IFUTILS_DATA_DIR=../shared/data .venv/bin/python benchmarks/network_grads.py --json benchmarks/results/network_grads.json

Setting: the PTB-size model (V = 10,000, E = H = 256, one layer, P = 5,656,592 parameters; random init, or
``--checkpoint checkpoints/ptb_lstm.pt``), real PTB training sentences batched as a pass over the whole training
set batches them (all 42,068 sorted by length, cut into chunks of b): max(1, ``--sentences`` // b) such chunks at
evenly spaced length quantiles (b = 256: the median chunk), so that padding is that of the real pass. Every gradient is
d l_i / d theta of all parameters, l_i the mean token NLL of sentence i (nats/token), float32. Methods:

* ``loop``: one sentence at a time through the model's fused ``nn.LSTM`` path, ``torch.autograd.grad`` of l_i
  with respect to every parameter, the tensors copied into one reused (P,) row (the baseline; it has no batch: its
  row at batch b times the same sentences as the other methods at b);
* ``batch_grads``: ``NetworkGrads.batch_grads`` ({name: (B, *shape)} per batch, one batched backward pass and the
  per-layer outer products);
* ``flat``: ``NetworkGrads.flat`` into one reused (B, P) buffer;
* ``opacus``: opacus's ``DPLSTM`` (weights copied from the model) inside ``GradSampleModule`` (hooks,
  ``loss_reduction="sum"`` of the per-sentence losses), the ``grad_sample`` tensors read per batch. Opacus is not a
  project dependency: install it for the benchmark with ``.venv/bin/pip install opacus torch==2.13.0`` (the torch
  pin on the same command line); without it the column reads ``-``.

Each (method, threads, batch) is timed in a fresh subprocess (``--worker``): one untimed warm-up on the first batch (it also
first-touches the reused buffers), then every batch of the sample; peak memory is that subprocess's ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (whole process,
MB), and ``above floor`` subtracts its maxrss after imports, data and model (before the first gradient). A run whose
estimated memory (the (B, P) gradients, twice for ``opacus``) exceeds 80% of the available memory is skipped and the
table says so. Agreement: max |g - g_loop| / max |g_loop| over 4 sentences, per method, in one more subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, maxrss_mb

METHODS = ("loop", "batch_grads", "flat", "opacus")
INSTALL = ".venv/bin/pip install opacus torch==2.13.0"


def have_opacus() -> bool:
    """Whether opacus can be imported (it is optional: see the module docstring)."""
    try:
        import opacus  # noqa: F401
    except ImportError:
        return False
    return True


def setup(args):
    """(model in eval mode, eos id, the sample of sentences): the PTB-size model and real PTB sentences."""
    import torch

    from ifutils.data import load_corpus
    from ifutils.io import load_checkpoint
    from ifutils.model import LSTMLM, ModelConfig

    if args.checkpoint:
        model, vocab, _ = load_checkpoint(ROOT / args.checkpoint if not Path(args.checkpoint).is_absolute()
                                          else args.checkpoint)
        corpus = load_corpus("ptb", vocab=vocab)
    else:
        corpus = load_corpus("ptb")
        torch.manual_seed(args.seed)
        model = LSTMLM(ModelConfig(vocab_size=len(corpus.vocab.itos), emb_dim=256, hidden=256))
    model.eval()
    train = corpus.splits["train"]
    if args.batch is None:  # the agreement check: random sentences
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: args.sentences]
        return model, corpus.vocab.stoi["<eos>"], [train[i] for i in pick.tolist()]
    # batches as scoring or fitting the whole training set cuts them: the set sorted by length, cut into chunks of b;
    # max(1, sentences // b) chunks at evenly spaced length quantiles (one chunk: the median one)
    b = args.batch
    order = sorted(range(len(train)), key=lambda i: len(train[i]))
    total, k = -(-len(order) // b), max(1, args.sentences // b)
    chunks = [int((c + 0.5) * total / k) for c in range(k)]
    return model, corpus.vocab.stoi["<eos>"], [train[i] for c in chunks for i in order[c * b : (c + 1) * b]]


class OpacusLM:
    """The LSTM LM rebuilt with opacus's ``DPLSTM`` and wrapped in ``GradSampleModule`` (weights copied)."""

    def __init__(self, model):
        import torch
        from opacus import GradSampleModule
        from opacus.layers import DPLSTM

        class LM(torch.nn.Module):
            def __init__(self):
                super().__init__()
                cfg = model.config
                self.embedding = torch.nn.Embedding(cfg.vocab_size, cfg.emb_dim)
                self.lstm = DPLSTM(cfg.emb_dim, cfg.hidden, cfg.num_layers, batch_first=True)
                self.decoder = torch.nn.Linear(cfg.hidden, cfg.vocab_size)

            def forward(self, inputs):
                return self.decoder(self.lstm(self.embedding(inputs))[0])

        lm = LM()
        lm.embedding.load_state_dict(model.embedding.state_dict())
        lm.lstm.load_state_dict(model.lstm.state_dict())
        lm.decoder.load_state_dict(model.decoder.state_dict())
        lm.train()  # opacus records activations only in training mode; this LM has no dropout, so it is the same map
        self.names = [n for n, _ in model.named_parameters()]
        self.module = GradSampleModule(lm, batch_first=True, loss_reduction="sum")
        own = dict(self.module.named_parameters())  # DPLSTM keeps nn.LSTM's names (weight_ih_l0, ...)
        self.params = [own[f"_module.{name}"] for name in self.names]

    def grads(self, inputs, targets, mask):
        """[(B, *shape)] per-sample gradients in ``named_parameters`` order of the original model."""
        from ifutils.model import sentence_loss

        for p in self.params:
            p.grad, p.grad_sample = None, None
        sentence_loss(self.module(inputs), targets, mask).sum().backward()
        return [p.grad_sample for p in self.params]


def loop_grads(model, params, sentence, eos_id):
    """Per-sample gradient of one sentence through the fused nn.LSTM path: a list of tensors."""
    import torch

    from ifutils.data import make_batch
    from ifutils.model import sentence_loss

    inputs, targets, mask = make_batch([sentence], eos_id)
    return torch.autograd.grad(sentence_loss(model(inputs), targets, mask)[0], params)


def worker(args) -> dict:
    """Time one (method, threads, batch) in this process; returns the measurements as a dict."""
    import torch

    from ifutils.data import bucket_batches, make_batch
    from ifutils.network import NetworkGrads

    torch.set_num_threads(args.threads)
    model, eos_id, sentences = setup(args)
    params = list(model.parameters())
    p = sum(t.numel() for t in params)
    b = args.batch
    batches = bucket_batches([len(s) for s in sentences], b)
    net = NetworkGrads(model, eos_id)
    buffer = None
    if args.method == "loop":
        buffer = torch.empty(p)  # one row, reused: the loop has no batch

        def run(idx):
            for i in idx:
                torch.cat([g.reshape(-1) for g in loop_grads(model, params, sentences[i], eos_id)], out=buffer)
    elif args.method == "batch_grads":
        def run(idx):
            net.batch_grads([sentences[i] for i in idx])
    elif args.method == "flat":
        buffer = torch.empty((b, p))

        def run(idx):
            net.flat([sentences[i] for i in idx], out=buffer)
    else:
        lm = OpacusLM(model)

        def run(idx):
            lm.grads(*make_batch([sentences[i] for i in idx], eos_id))
    floor = maxrss_mb()
    run(batches[0])  # warm-up, untimed: thread pool, allocator, opacus hooks, first touch of the buffer
    start = time.perf_counter()
    for idx in batches:
        run(idx)
    seconds = time.perf_counter() - start
    tokens = sum(len(s) for s in sentences)
    padded = sum(len(idx) * max(len(sentences[i]) for i in idx) for idx in batches)
    return {"method": args.method, "threads": args.threads, "batch": b, "sentences": len(sentences),
            "tokens": tokens, "padded_tokens": padded, "seconds": seconds, "sentences_per_s": len(sentences) / seconds,
            "peak_mb": maxrss_mb(), "floor_mb": floor}


def check(args) -> dict:
    """max |g - g_loop| / max |g_loop| of each method on the first 4 sentences of the sample (float32)."""
    import torch

    from ifutils.data import make_batch
    from ifutils.network import NetworkGrads

    model, eos_id, sentences = setup(args)
    few = sentences[:4]
    params = list(model.parameters())
    ref = torch.stack([torch.cat([g.reshape(-1) for g in loop_grads(model, params, s, eos_id)]) for s in few])
    scale = ref.abs().max().item()
    out = {"flat": (NetworkGrads(model, eos_id).flat(few) - ref).abs().max().item() / scale}
    if have_opacus():
        got = OpacusLM(model).grads(*make_batch(few, eos_id))
        out["opacus"] = (torch.cat([g.reshape(len(few), -1) for g in got], 1) - ref).abs().max().item() / scale
    return out


def available_mb() -> float:
    """MemAvailable of /proc/meminfo, MB (inf where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def spawn(args, extra: list[str], threads: int) -> dict:
    """Run this script with ``--worker`` or ``--check`` in a fresh subprocess with ``threads`` threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, __file__, "--sentences", str(args.sentences), "--seed", str(args.seed),
           "--threads", str(threads), *extra] + (["--checkpoint", args.checkpoint] if args.checkpoint else [])
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--threads-list", type=int, nargs="+", default=[1, 2], dest="threads_list")
    parser.add_argument("--sentences", type=int, default=64, help="sentences timed per run (at least one batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="e.g. checkpoints/ptb_lstm.pt (default: random init)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--json", default=None, help="write the rows here (e.g. benchmarks/results/network_grads.json)")
    parser.add_argument("--worker", choices=METHODS, default=None, dest="method", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.method:
        print(json.dumps(worker(args)))
        return 0
    if args.check:
        print(json.dumps(check(args)))
        return 0
    if any(b < 1 for b in args.batch_sizes) or any(t < 1 for t in args.threads_list) or args.sentences < 1:
        parser.error("batch sizes, thread counts and --sentences must be >= 1")
    methods = list(args.methods)
    if "opacus" in methods and not have_opacus():
        print(f"opacus is not installed: its rows are skipped. For the comparison, install it with `{INSTALL}` "
              f"(keep the torch pin on the same command line) and rerun.")
        methods.remove("opacus")
    p = 5_656_592
    agreement = spawn(args, ["--check"], 1)
    rows = []
    for threads in args.threads_list:
        for method in methods:
            for b in args.batch_sizes:
                need = 4 * b * p / 2**20 * (2 if method == "opacus" else 1)
                if need > 0.8 * available_mb():
                    rows.append({"method": method, "threads": threads, "batch": b,
                                 "skipped": f"needs ~{need:.0f} MB, {available_mb():.0f} MB available"})
                    print(f"skip {method} b={b}: {rows[-1]['skipped']}", file=sys.stderr)
                    continue
                rows.append(spawn(args, ["--worker", method, "--batch", str(b)], threads))
                print(f"{method:12s} threads={threads} b={b:4d} {rows[-1]['sentences_per_s']:8.1f} sentences/s",
                      file=sys.stderr)
    print_table(rows, args.batch_sizes, args.threads_list)
    print("agreement with the loop, max |g - g_loop| / max |g_loop| over 4 sentences: "
          + ", ".join(f"{k} {v:.1e}" for k, v in agreement.items()))
    if args.json:
        from ifutils.io import atomic_write, environment, project_path

        result = {"command": " ".join(["benchmarks/network_grads.py", *(argv if argv is not None else sys.argv[1:])]),
                  "settings": vars(args), "environment": environment(), "agreement": agreement, "rows": rows}
        atomic_write(project_path(args.json), lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    return 0


def print_table(rows: list[dict], batch_sizes: list[int], threads_list: list[int]) -> None:
    """The table: sentences/s, ratios against the loop and opacus at the same threads and batch, peak memory."""
    def find(method, threads, b=None):
        for r in rows:
            if r["method"] == method and r["threads"] == threads and (b is None or r["batch"] == b) and "seconds" in r:
                return r
        return None

    print(f"{'method':12s} {'threads':>7s} {'batch':>5s} {'sent/s':>9s} {'x loop':>7s} {'x opacus':>8s} "
          f"{'peak MB':>8s} {'above floor':>11s}")
    for threads in threads_list:
        for r in [r for r in rows if r["threads"] == threads]:
            loop = find("loop", threads, r["batch"])
            if "skipped" in r:
                print(f"{r['method']:12s} {threads:7d} {r['batch']:5d} skipped: {r['skipped']}")
                continue
            op = find("opacus", threads, r["batch"])
            vs_loop = f"{r['sentences_per_s'] / loop['sentences_per_s']:7.2f}" if loop else f"{'-':>7s}"
            vs_op = f"{r['sentences_per_s'] / op['sentences_per_s']:8.2f}" if op else f"{'-':>8s}"
            batch = str(r["batch"])
            print(f"{r['method']:12s} {threads:7d} {batch:>5s} {r['sentences_per_s']:9.1f} {vs_loop} {vs_op} "
                  f"{r['peak_mb']:8.0f} {r['peak_mb'] - r['floor_mb']:11.0f}")


if __name__ == "__main__":
    sys.exit(main())
