"""The house: the core never imports the experiments, and the public API is what ``__all__`` says."""

import ast
from pathlib import Path

import ifutils

PACKAGE = Path(ifutils.__file__).resolve().parent


def _imports(path: Path, package_dir: Path = PACKAGE) -> list[str]:
    """Absolute module names imported by a file of the package at ``package_dir`` (relative imports resolved)."""
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.append(module)
            out += [f"{module}.{a.name}" for a in node.names]  # from x import submodule
    return out


def test_no_core_module_imports_an_experiment():
    core = [p for p in PACKAGE.rglob("*.py") if "experiments" not in p.relative_to(PACKAGE).parts]
    assert len(core) > 10
    offenders = {str(p.relative_to(PACKAGE)): m for p in core for m in _imports(p)
                 if m == "ifutils.experiments" or m.startswith("ifutils.experiments.")}
    assert not offenders, f"core modules import experiments: {offenders}"


def test_import_checker_sees_a_relative_import(tmp_path):
    """The checker itself: a relative import of the experiments from a core-level file is caught."""
    package = tmp_path / "ifutils"
    (package / "curvature").mkdir(parents=True)
    fake = package / "curvature" / "probe.py"
    fake.write_text("from ..experiments import plots\nfrom .base import Curvature\nimport ifutils.experiments.sweeps\n")
    found = _imports(fake, package)
    assert "ifutils.experiments.sweeps" in found and "ifutils.experiments" in found and "ifutils.curvature.base" in found


def test_public_api_exports_exist():
    assert sorted(ifutils.__all__) == sorted(set(ifutils.__all__))
    missing = [n for n in ifutils.__all__ if not hasattr(ifutils, n)]
    assert not missing


def test_every_label_round_trips_to_its_key():
    from ifutils.curvature.labels import LABELS, key_of, label

    keys = list(LABELS) + ["ef_diag", "mc_fisher_k4_diag", "ggn_diag", "ef_blockdiag", "mc_fisher_k4", "arnoldi_r64", "arnoldi_r8_complement"]
    assert all(key_of(label(k)) == k for k in keys)
    assert label("mc_fisher_k4") == "true Fisher (MC, k=4)" and label("hessian_diag") == "Hessian (diag)"
    assert len(set(map(label, keys))) == len(keys)
