"""Short keys of the curvatures and damping-free scores, and their display labels: the one table of labels.

Code and results files name a curvature by its key (``"ggn"``, ``"ekfac"``); only tables and figures turn a key
into text, through :func:`label`. Derived forms append a suffix to their parent's key: ``"<key>_diag"`` (the
diagonal), ``"<key>_blockdiag"`` (block-diagonal, one block per parameter tensor); the Monte Carlo true Fisher
carries its number of label draws, ``"mc_fisher_k4"``; the Arnoldi iHVP its rank, ``"arnoldi_r64"`` (projection
onto the top Ritz pairs of the Hessian, Schioppa et al. 2022), ``"arnoldi_r64_complement"`` (1/damping on their
complement) and ``"ggn_arnoldi_r64"`` (the same projection for the GGN).
"""

from __future__ import annotations

import re

LABELS: dict[str, str] = {
    "hessian": "Hessian",
    "ggn": "GGN (true Fisher, closed form)",
    "mc_fisher": "true Fisher (MC)",
    "ef": "EF",
    "ef_all": "EF (every training sentence)",
    "ef_token": "EF (token)",
    "ef_woodbury": "EF (Woodbury)",
    "ef_datainf": "EF (DataInf)",
    "kfac": "KFAC",
    "ekfac": "EK-FAC",
    "kfac_ef": "KFAC (EF labels)",
    "ekfac_ef": "EK-FAC (EF labels)",
    "kfac_all": "KFAC (every training sentence)",
    "ekfac_all": "EK-FAC (every training sentence)",
    "hessian_cg": "Hessian (CG)",
    "hessian_lissa": "Hessian (LiSSA)",
    "arnoldi": "Hessian (Arnoldi)",
    "identity": "identity (gradient dot product)",
    "cosine": "gradient cosine",
    "tracin": "TracIn (summed over checkpoints)",
    "trak": "TRAK-style (random projection + projected EF)",
    "subset_hessian": "512-coordinate subset Hessian",
    "tfidf": "TF-IDF cosine (token overlap, no gradients)",
}
"""Base key -> display label."""

SUFFIXES = {"_diag": " (diag)", "_blockdiag": " (block-diag)"}

_MC = re.compile(r"^mc_fisher_k(\d+)$")
_ARNOLDI = re.compile(r"^arnoldi_r(\d+)(_complement)?$")
_GGN_ARNOLDI = re.compile(r"^ggn_arnoldi_r(\d+)$")


def label(key: str) -> str:
    """Display label of a curvature key, e.g. ``label("ggn_diag") == "GGN (true Fisher, closed form) (diag)"``,
    ``label("mc_fisher_k4") == "true Fisher (MC, k=4)"``.

    Raises:
        KeyError: an unknown key, naming the known base keys.
    """
    if not isinstance(key, str):
        raise TypeError(f"a curvature key is a str such as 'ggn', got {key!r} ({type(key).__name__})")
    for suffix, text in SUFFIXES.items():
        if key.endswith(suffix):
            return label(key[: -len(suffix)]) + text
    if m := _MC.match(key):
        return f"true Fisher (MC, k={int(m[1])})"
    if m := _ARNOLDI.match(key):
        return f"Hessian (Arnoldi, r={int(m[1])}, {'+ complement' if m[2] else 'Schioppa'})"
    if m := _GGN_ARNOLDI.match(key):
        return f"GGN (Arnoldi, r={int(m[1])}, Schioppa)"
    if key in LABELS:
        return LABELS[key]
    raise KeyError(f"unknown curvature key {key!r}; base keys are {', '.join(LABELS)} (with _diag, _blockdiag, "
                   "mc_fisher_k<k>, arnoldi_r<r>[_complement])")


def key_of(text: str) -> str:
    """The key whose :func:`label` is ``text`` (the inverse, for results files written before keys existed).

    Raises:
        KeyError: no key has this label.
    """
    for suffix, shown in SUFFIXES.items():
        if text.endswith(shown):
            return key_of(text[: -len(shown)]) + suffix
    if m := re.match(r"^true Fisher \(MC, k=(\d+)\)$", text):
        return f"mc_fisher_k{m[1]}"
    if m := re.match(r"^Hessian \(Arnoldi, r=(\d+), (Schioppa|\+ complement)\)$", text):
        return f"arnoldi_r{m[1]}" + ("_complement" if m[2] != "Schioppa" else "")
    if m := re.match(r"^GGN \(Arnoldi, r=(\d+), Schioppa\)$", text):
        return f"ggn_arnoldi_r{m[1]}"
    for key, shown in LABELS.items():
        if shown == text:
            return key
    raise KeyError(f"no curvature key has the label {text!r}")
