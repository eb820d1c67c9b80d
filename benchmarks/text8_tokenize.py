"""Throughput and peak memory of the streaming text8 reader on a synthetic text8-format file.

Generates a file of ``--megabytes`` (default 100, the size of text8) of Zipf-distributed lowercase words,
then, each in a fresh subprocess, measures:
  * ``import``: Python + torch + ifutils imported, nothing read (the memory floor);
  * ``streaming``: ``ifutils.data.read_text8`` (two streaming passes, ids kept as int32);
  * ``read-all``: the baseline, the whole file read and split at once, then encoded.
Prints a table with seconds, MB/s and peak resident memory; ratios are against ``read-all``.

    .venv/bin/python benchmarks/text8_tokenize.py [--megabytes 100]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np


def make_file(path: Path, size: int, seed: int = 0, vocab: int = 50_000) -> None:
    """Exactly ``size`` bytes in text8 format: a leading space, words of a-z joined by single spaces."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
    lexicon = ["".join(map(chr, rng.choice(letters, rng.integers(2, 10)))) for _ in range(vocab)]
    written = 0
    with open(path, "wb") as f:
        while written < size:
            ids = np.minimum(rng.zipf(1.3, 200_000), vocab) - 1
            block = (" " + " ".join(lexicon[i] for i in ids)).encode()[: size - written]
            if block.endswith(b" "):  # never end on a space that the next block would double
                block = block[:-1] + b"a"
            f.write(block)
            written += len(block)


def worker(mode: str, path: str) -> dict:
    import ifutils.data as data  # noqa: F401  (imported in every mode so the floor is comparable)

    start = time.perf_counter()
    if mode == "streaming":
        windows = len(data.read_text8(Path(path), "synthetic", window=35).splits["train"])
    elif mode == "read-all":
        words = Path(path).read_text().split()
        cut = int(len(words) * 0.9)
        vocab = data.Vocabulary.from_counts(Counter(words[:cut]) + Counter({data.UNK: 1}), 10_000)
        ids = np.array([vocab.stoi.get(w, vocab.stoi[data.UNK]) for w in words], np.int32)
        windows = cut // 35
        del ids
    else:
        windows = 0
    return {"seconds": time.perf_counter() - start, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "windows": windows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=100.0, help="size of the synthetic file (MB = 10^6 bytes)")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "text8_synthetic"
        size = int(args.megabytes * 1e6)
        make_file(path, size)
        rows = {}
        for mode in ("import", "streaming", "read-all"):
            out = subprocess.run([sys.executable, __file__, "--worker", mode, str(path)], check=True,
                                 capture_output=True, text=True).stdout
            rows[mode] = json.loads(out.strip().splitlines()[-1])
    floor, base = rows["import"]["peak_mb"], rows["read-all"]
    print(f"synthetic text8-format file: {size:,} bytes; peak memory floor (imports only) {floor:.0f} MB")
    print(f"{'method':10s} {'seconds':>8s} {'MB/s':>7s} {'peak MB':>8s} {'above floor':>12s} {'time / read-all':>16s} "
          f"{'memory above floor / read-all':>30s}")
    for mode in ("streaming", "read-all"):
        r = rows[mode]
        print(f"{mode:10s} {r['seconds']:8.1f} {size / 1e6 / r['seconds']:7.1f} {r['peak_mb']:8.0f} "
              f"{r['peak_mb'] - floor:12.0f} {r['seconds'] / base['seconds']:16.2f} "
              f"{(r['peak_mb'] - floor) / (base['peak_mb'] - floor):30.2f}")


if __name__ == "__main__":
    main()
