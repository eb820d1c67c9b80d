"""Rewrite docs/results.md from results/*.json (ifutils.experiments.report); tests/test_docs.py checks it is current.

    python experiments/report.py                       # results/ -> docs/results.md
    python experiments/report.py --results DIR --out FILE
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ifutils.experiments.report import write_results_md


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "results", help="folder of results JSON files")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md", help="markdown file to write")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        parser.error(f"--results {args.results} is not a directory; pass the folder holding the results JSON files")
    path = write_results_md(args.results, args.out, tracked_only=True)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
