"""The whole-network code restricted to the comparison's 512-coordinate subset reproduces the subset numbers
(``ifutils.experiments.bridge``): per-sample gradients, H and GGN products, and the agreement table at lambda = 1e-4.

    IFUTILS_DATA_DIR=../shared/data .venv/bin/python experiments/bridge.py

Reads the default comparison's checkpoint and results (``results/ptb.json``, section ``influence``); writes
``results/ptb_bridge.json``. The subset gradients and the structured H / GGN are read from ``--cache`` when the
comparison left them there (else computed, a few minutes).
"""

from __future__ import annotations

import argparse
import json

from ifutils.data import load_corpus
from ifutils.experiments.bridge import format_bridge, subset_bridge
from ifutils.io import atomic_write, check_corpus, checkpoint_record, environment, load_checkpoint, project_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/ptb_lstm.pt")
    parser.add_argument("--committed", default="results/ptb.json", help="results file with the subset numbers")
    parser.add_argument("--results", default="results/ptb_bridge.json")
    parser.add_argument("--cache", default="cache")
    parser.add_argument("--probes", type=int, default=4)
    args = parser.parse_args()
    model, vocab, payload = load_checkpoint(project_path(args.checkpoint))
    corpus = load_corpus("ptb", vocab=vocab)
    check_corpus(payload, corpus)
    committed = json.loads(project_path(args.committed).read_text())
    record = checkpoint_record(project_path(args.checkpoint))
    if committed.get("influence", {}).get("provenance", {}).get("checkpoint", {}).get("sha256") not in (None, record["sha256"]):
        raise SystemExit(f"{args.committed} was computed on another checkpoint than {args.checkpoint}")
    out = subset_bridge(model.eval(), corpus, committed.get("influence"), probes=args.probes,
                        cache_dir=project_path(args.cache))
    out["provenance"] = {"checkpoint": record}
    out["environment"] = environment()
    atomic_write(project_path(args.results), lambda tmp: tmp.write_text(json.dumps(out, indent=1)))
    print(format_bridge(out))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
