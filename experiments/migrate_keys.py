"""One-off migration of results files written before curvature keys existed: display labels become keys.

Results files used to name curvatures by their display label ("GGN (true Fisher, closed form)", "EK-FAC",
"true Fisher (MC, k=4)"); they now use the short keys of :mod:`ifutils.curvature.labels` ("ggn", "ekfac",
"mc_fisher_k4"), and only tables and figures turn a key into its label. This command rewrites, in place:

* every dict key that is a label (``spectra``, ``matrix_errors`` and its inner references, the ground truth's
  ``agreement``, the robustness sweeps' ``best_damping``, ...);
* every ``"curvature"`` value (rows of the damping sweeps, comparison table, robustness rows) and every entry of a
  ``"shared_with"`` list;
* in ``retrain_check.json``, the method names (``config.methods``, ``removed``, ``methods``): "Hessian", "GGN",
  "EF" become "hessian", "ggn", "ef" ("identity" and "random" stay).

``spectrum.json`` is left as it is: its "F", "H", "EF" name the whole-network estimators of
:mod:`ifutils.curvature.estimators` (whose EF has no T_i weight, unlike the key "ef"), not the comparison's
curvatures. Every number and every other string is kept; each file is written atomically
(:func:`ifutils.io.atomic_write`) and only when something changed, so a second run changes nothing.

Usage: .venv/bin/python experiments/migrate_keys.py [--check] [results/ptb.json ...]   (default: results/*.json)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ifutils.curvature.labels import key_of, label
from ifutils.io import atomic_write, project_path

SKIPPED = {"spectrum.json"}
"""Files whose curvature names are not comparison keys (module docstring)."""
RETRAIN_METHODS = {"GGN": "ggn"}
"""retrain_check.json's one method name that is neither a key nor a label."""


def to_key(name: str, legacy: dict[str, str] | None = None) -> str:
    """The key of ``name``: itself when it is already a key, else the key whose label it is (``key_of``), else
    ``legacy[name]``; any other string is returned unchanged (e.g. ``"random"``, outlier-score names)."""
    try:
        label(name)
        return name
    except KeyError:
        pass
    try:
        return key_of(name)
    except KeyError:
        return (legacy or {}).get(name, name)


def migrate(obj, legacy: dict[str, str] | None = None, field: str | None = None):
    """A copy of the JSON value ``obj`` with every label in a dict key, a ``"curvature"`` value or a
    ``"shared_with"``/``"methods"`` list turned into its key (:func:`to_key`); dict order is kept."""
    if isinstance(obj, dict):
        return {to_key(k, legacy) if isinstance(k, str) else k: migrate(v, legacy, k) for k, v in obj.items()}
    if isinstance(obj, list):
        if field in ("shared_with", "methods"):
            return [to_key(x, legacy) if isinstance(x, str) else migrate(x, legacy) for x in obj]
        return [migrate(x, legacy) for x in obj]
    if field == "curvature" and isinstance(obj, str):
        return to_key(obj, legacy)
    return obj


def migrate_file(path: Path, write: bool = True) -> bool:
    """Migrate one results file in place (atomically); True when it changed (or, with ``write=False``, would)."""
    text = path.read_text()
    data = json.loads(text)
    new = migrate(data, RETRAIN_METHODS if path.name == "retrain_check.json" else None)
    if new == data:
        return False
    if write:
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(new, indent=1, default=float)))
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="results files (default: results/*.json)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file still needs migrating")
    args = parser.parse_args()
    files = args.files or sorted(project_path("results").glob("*.json"))
    pending = []
    for path in files:
        if not path.is_file():
            sys.exit(f"{path}: no such file; pass results/<tag>.json or nothing for results/*.json")
        if path.name in SKIPPED:
            print(f"{path}: skipped (whole-network estimator names F, H, EF)")
            continue
        changed = migrate_file(path, write=not args.check)
        print(f"{path}: {('needs migrating' if args.check else 'migrated') if changed else 'already keys'}")
        pending += [path] if changed else []
    if args.check and pending:
        sys.exit(1)


if __name__ == "__main__":
    main()
