"""experiments/migrate_keys.py: display labels in a results file become keys, nothing else changes, twice is once."""

import importlib.util
import json
import math
from pathlib import Path

from ifutils.curvature.labels import key_of, label

spec = importlib.util.spec_from_file_location("migrate_keys", Path(__file__).parent.parent / "experiments" / "migrate_keys.py")
migrate_keys = importlib.util.module_from_spec(spec)
spec.loader.exec_module(migrate_keys)


def _leaves(obj, out):
    if isinstance(obj, dict):
        for v in obj.values():
            _leaves(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _leaves(v, out)
    else:
        out.append(obj)
    return out


OLD = {
    "influence": {
        "spectra": {"Hessian": {"mean": 1.5}, "true Fisher (MC, k=4)": {"mean": 0.25}},
        "agreement": [{"curvature": "GGN (true Fisher, closed form) (diag)", "spearman": 0.5, "warnings": ["EF"]},
                      {"curvature": "gradient cosine", "spearman": float("nan")}],
        "comparison": [{"curvature": "Hessian", "shared_with": ["GGN (true Fisher, closed form)", "EF (token)"]}],
        "matrix_errors": {"Hessian (Arnoldi, r=64, + complement)": {"Hessian": 0.1, "GGN (true Fisher, closed form)": 2}},
        "detection": {"gradient L1 norm": {"spearman_test_influence": 0.3}},
        "seconds": {"curvature: KFAC + EK-FAC": 4.0},
    },
}
NEW = {
    "influence": {
        "spectra": {"hessian": {"mean": 1.5}, "mc_fisher_k4": {"mean": 0.25}},
        "agreement": [{"curvature": "ggn_diag", "spearman": 0.5, "warnings": ["EF"]},
                      {"curvature": "cosine", "spearman": float("nan")}],
        "comparison": [{"curvature": "hessian", "shared_with": ["ggn", "ef_token"]}],
        "matrix_errors": {"arnoldi_r64_complement": {"hessian": 0.1, "ggn": 2}},
        "detection": {"gradient L1 norm": {"spearman_test_influence": 0.3}},
        "seconds": {"curvature: KFAC + EK-FAC": 4.0},
    },
}


def test_labels_become_keys_and_every_number_stays(tmp_path):
    path = tmp_path / "ptb.json"
    path.write_text(json.dumps(OLD, indent=1))
    assert migrate_keys.migrate_file(path)
    text = path.read_text()
    migrated = json.loads(text)
    # NaN != NaN, so compare the JSON text of the expectation (key order included)
    assert text == json.dumps(NEW, indent=1)
    old, new = _leaves(OLD, []), _leaves(migrated, [])
    for a, b in zip(old, new, strict=True):
        if isinstance(a, float):
            assert a == b or (math.isnan(a) and math.isnan(b))
        elif a != b:
            assert key_of(a) == b and label(b) == a  # only labels changed, each into its own key
    assert not migrate_keys.migrate_file(path) and path.read_text() == text  # idempotent


def test_retrain_methods_and_their_sections_are_renamed(tmp_path):
    path = tmp_path / "retrain_check.json"
    old = {"config": {"methods": ["Hessian", "GGN", "EF", "identity", "random"]},
           "removed": {"GGN": [3, 1], "random": [0]}, "methods": {"Hessian": {"valid": {"mean": -1.0}}}}
    path.write_text(json.dumps(old, indent=1))
    assert migrate_keys.migrate_file(path)
    new = json.loads(path.read_text())
    assert new == {"config": {"methods": ["hessian", "ggn", "ef", "identity", "random"]},
                   "removed": {"ggn": [3, 1], "random": [0]}, "methods": {"hessian": {"valid": {"mean": -1.0}}}}
    assert not migrate_keys.migrate_file(path)


def test_committed_results_hold_keys_only():
    """No committed results file needs migrating (spectrum.json keeps the estimators' F, H, EF)."""
    root = Path(__file__).parent.parent / "results"
    for path in sorted(root.glob("*.json")):
        if path.name not in migrate_keys.SKIPPED:
            assert not migrate_keys.migrate_file(path, write=False), path
