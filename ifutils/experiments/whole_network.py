"""Whole-network influence on the trained LSTM LM: every parameter tensor, Kronecker-factored and diagonal Fishers,
an exact matrix-free reference, every training sentence scored, and what the scores find, shown as text.

Influence of training sentence i on query j: I_ij = -g_i^T (C + lambda I)^{-1} g_j (Koh & Liang 2017, eq. 2), g the
gradient of a sentence's mean token NLL (nats/token) over all P parameters; the queries are the mean validation loss
L_val = (1/n_val) sum_j l_j and ``n_test`` test sentences. Stages (each timed with its own peak memory; long ones
cached or resumable):

1. query gradients (:class:`~ifutils.network.NetworkGrads`);
2. KFAC / EK-FAC factors with true-Fisher labels on ``n_fit`` training sentences (:mod:`ifutils.curvature.network_kfac`;
   decoder in closed form, sampled labels elsewhere); damping lambda = ``alpha`` x EK-FAC's mean eigenvalue
   (kronfluence's relative default), the same absolute lambda for every curvature;
3. the full pass: every one of the first ``n_train`` training sentences (all 42,068 by default) scored against the
   1 + n_test EK-FAC queries, streamed to disk and resumable (:func:`ifutils.scoring.score_all`), with nothing but
   its queries in memory, so its time and peak memory are the scoring's own;
4. the other curvatures on the same ``n_fit`` sentences: KFAC and EK-FAC with data labels (empirical Fisher), the
   diagonal true Fisher (sampled labels) and the diagonal EF, and the identity (gradient dot product, TracIn at the
   last checkpoint);
5. the exact reference (:func:`exact_reference`): Lanczos extreme eigenvalues of the whole-network Hessian H and GGN
   F on the ``n_fit`` sentences, and CG solves (C + lambda I)^{-1} g for C = F and C = H (where H + lambda I is
   positive definite) at the absolute dampings ``exact_dampings``, for the validation query and the first
   ``n_exact`` test queries, with every solve's iterations and true residual;
6. the agreement set, the first ``n_agree`` training sentences, scored by every curvature at the default damping
   (every query) and at each damping of ``damping_grid`` (the exact queries), and by the exact references, in
   passes of at most ``pass_gib`` GiB of queries;
7. agreement: Spearman and Pearson over training sentences per test query and top-k overlap, means over test queries
   with percentile-bootstrap 95 % intervals over them; against EK-FAC at the default damping, and against each exact
   reference at its damping and at each curvature's best damping of the grid; the validation query separately;
8. the 10 most helpful (most negative I) and 10 most harmful (most positive I) sentences, as text, for one test
   sentence and for the validation query: every curvature side by side on the agreement set, EK-FAC on all of them.

Why the exact reference is not at the default damping: CG needs about sqrt(kappa) iterations, kappa =
(lambda_max + lambda) / lambda; with lambda_max ~ 0.7 (Lanczos) and the default lambda ~ 1e-6 that is ~800 products
of the whole network per column, against ~10-40 at lambda = 1e-2.
"""


from __future__ import annotations

import json
import resource
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from ..cache import ChunkCache
from ..config import param, validate_fields
from ..curvature.base import IdentityCurvature
from ..curvature.inverse import SolverWarning
from ..curvature.labels import label
from ..curvature.network_kfac import (
    diagonal_fisher,
    ekfac_network_curvature,
    fit_network_kfac,
    kfac_network_curvature,
)
from ..data import bucket_batches
from ..io import atomic_write, checkpoint_record, environment
from ..metrics import bootstrap_ci
from ..network import NetworkGrads
from ..progress import progress
from ..scoring import query_dict, score_all


@dataclass
class WholeNetworkConfig:
    """Settings of the whole-network study; saved with its results."""

    n_fit: int = param(200, "training sentences the curvatures are fitted on (seeded draw)")
    mc_samples: int = param(1, "label draws per position for the true-Fisher factors and the diagonal true Fisher")
    n_test: int = param(100, "test sentences whose loss is explained (seeded draw)")
    n_valid: int | None = param(None, "validation sentences of the mean-validation-loss query; None: all")
    n_train: int | None = param(None, "training sentences scored under EK-FAC (the first n_train); None: all")
    n_agree: int = param(5000, "the first n_agree training sentences are scored by every curvature (agreement set)")
    n_exact: int = param(10, "test queries (the first n_exact of n_test) solved exactly, with the validation query")
    exact_curvatures: tuple[str, ...] = param(("F", "H"), "exact references by CG: 'F' (GGN) and/or 'H' (Hessian)")
    exact_dampings: tuple[float, ...] = param((1e-2,), "absolute dampings of the exact CG references")
    damping_grid: tuple[float, ...] = param((1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
                                            "absolute dampings at which every curvature is also scored")
    cg_tol: float = param(1e-4, "CG stops at this relative residual")
    cg_max_iter: int = param(400, "CG products per column at most")
    lanczos_tol: float = param(1e-2, "relative accuracy of the extreme eigenvalues (ARPACK tol)")
    pass_gib: float = param(6.0, "GiB of float32 preconditioned queries per agreement scoring pass")
    alpha: float = param(0.1, "the default damping is alpha x the mean eigenvalue of EK-FAC, one absolute lambda for all")
    top_k: int = param(100, "size of the top sets whose overlap with the reference is reported")
    shown: int = param(10, "most helpful / most harmful sentences shown as text")
    chunk_size: int = param(32, "sentences per chunk (fitting, query gradients, scoring)")
    lanczos_matvecs: int = param(100, "curvature-vector products per Lanczos run at most")
    seed: int = param(0, "seeds the sentence draws and the sampled labels")

    def __post_init__(self):
        validate_fields(self)
        for name in ("n_fit", "mc_samples", "n_test", "top_k", "shown", "chunk_size", "lanczos_matvecs", "n_agree",
                     "cg_max_iter"):
            if getattr(self, name) < 1:
                raise ValueError(f"WholeNetworkConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.alpha > 0:
            raise ValueError(f"WholeNetworkConfig.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.n_exact <= self.n_test:
            raise ValueError(f"WholeNetworkConfig.n_exact must be in [0, n_test={self.n_test}], got {self.n_exact}")
        if unknown := [c for c in self.exact_curvatures if c not in ("F", "H")]:
            raise ValueError(f"WholeNetworkConfig.exact_curvatures takes 'F' and 'H', got {unknown}")
        if any(not d > 0 for d in (*self.exact_dampings, *self.damping_grid)):
            raise ValueError("every exact damping and grid damping must be > 0")
        if self.exact_curvatures and not set(self.exact_dampings) <= set(self.damping_grid):
            raise ValueError(f"exact_dampings {self.exact_dampings} must be in damping_grid {self.damping_grid}, "
                             f"so that every curvature is scored at the reference's damping")
        if not (self.cg_tol > 0 and self.lanczos_tol > 0 and self.pass_gib > 0):
            raise ValueError("cg_tol, lanczos_tol and pass_gib must be > 0")


REFERENCE = "ekfac"


def _reset_peak() -> bool:
    """Reset the kernel's record of this process's peak resident memory (Linux: ``5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mib() -> float | None:
    """VmHWM, the peak resident memory since the last reset (MiB); None where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Stages:
    """Wall seconds and peak resident memory of each named stage: ``stage_peak_mib``, the peak during the stage alone
    (Linux, where the peak can be reset at its start), and ``peak_rss_mib``, the whole process's so far."""

    def __init__(self):
        self.records: dict[str, dict] = {}

    def __call__(self, name: str):
        stages = self

        class _Timed:
            def __enter__(self):
                print(f"[stage] {name} ...", flush=True)
                self.reset = _reset_peak()
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                seconds = time.perf_counter() - self.start
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                stage_peak = _peak_mib() if self.reset else None
                stages.records[name] = {"seconds": seconds, "peak_rss_mib": peak, "stage_peak_mib": stage_peak}
                shown = f"{stage_peak:.0f} MiB in the stage" if stage_peak is not None else f"{peak:.0f} MiB"
                print(f"[stage] {name} done in {seconds:.1f} s (peak memory {shown})", flush=True)

        return _Timed()


def query_gradients(net: NetworkGrads, valid: list[torch.Tensor], test: list[torch.Tensor], chunk_size: int,
                    cache_dir=None) -> torch.Tensor:
    """(1 + n_test, P) float32: the gradient of the mean validation loss (1/n_val) sum_j l_j, then each test
    sentence's g, in :class:`~ifutils.network.NetworkGrads`' flat layout; l in nats/token."""
    cache = None
    if cache_dir is not None:
        cache = ChunkCache(cache_dir, {"stage": "whole-network query gradients", "chunk_size": chunk_size},
                           dict(net.model.named_parameters()), valid, test, code="ifutils.network")
        stored = cache.get("queries")
        if stored is not None:
            return stored
    total = torch.zeros(net.p, dtype=torch.float64)
    batches = bucket_batches([len(s) for s in valid], chunk_size)
    for idx in progress(batches, desc="validation-loss gradient", unit="chunk"):
        total += net.flat([valid[i] for i in idx]).double().sum(0).cpu()
    rows = [(total / len(valid)).float()]
    for idx in progress(bucket_batches([len(s) for s in test], chunk_size), desc="test gradients", unit="chunk"):
        g = net.flat([test[i] for i in idx]).float().cpu()
        rows += [(i, r) for i, r in zip(idx, g)]
    test_rows = dict(rows[1:])
    out = torch.stack([rows[0]] + [test_rows[i] for i in range(len(test))])
    if cache is not None:
        cache.put("queries", out)
    return out


def _sentence_text(vocab, sentence: torch.Tensor) -> str:
    return " ".join(vocab.itos[int(i)] for i in sentence[:-1])


def agreement_with_reference(scores: np.ndarray, reference: np.ndarray, top_k: int, seed: int = 0) -> dict:
    """Agreement of one curvature's (n, 1 + n_test) influence matrix with the reference's: per test query (columns
    1..), Spearman and Pearson over training sentences and the overlap of the top-k most harmful and most helpful
    sets, means over test queries with percentile-bootstrap 95 % intervals over test queries (scipy.stats); the
    validation query (column 0) on its own."""
    def column_stats(j):
        a, b = scores[:, j].astype(np.float64), reference[:, j].astype(np.float64)
        k = min(top_k, len(a))
        overlap = lambda x, y: len(set(np.argsort(x)[-k:]) & set(np.argsort(y)[-k:])) / k  # noqa: E731
        return {"spearman": float(stats.spearmanr(a, b)[0]), "pearson": float(stats.pearsonr(a, b)[0]),
                "top_k_harmful": overlap(a, b), "top_k_helpful": overlap(-a, -b)}

    per_test = [column_stats(j) for j in range(1, scores.shape[1])]
    out = {"validation": column_stats(0), "k": min(top_k, len(scores))}
    for metric in ("spearman", "pearson", "top_k_harmful", "top_k_helpful"):
        values = np.array([r[metric] for r in per_test])
        ci = (bootstrap_ci(lambda idx, v=values: float(v[idx].mean()), len(values), seed)
              if len(values) > 1 else (float("nan"), float("nan")))
        out[metric] = {"mean": float(values.mean()), "ci": list(ci)}
    return out


def top_sentences(scores: np.ndarray, column: int, sentences: list[torch.Tensor], vocab, shown: int) -> dict:
    """The ``shown`` most helpful (most negative influence) and most harmful training sentences of one query:
    [{"index", "influence", "text"}], most extreme first."""
    col = scores[:, column].astype(np.float64)
    order = np.argsort(col, kind="stable")
    pick = lambda idx: [{"index": int(i), "influence": float(col[i]), "text": _sentence_text(vocab, sentences[i])}  # noqa: E731
                        for i in idx]
    return {"helpful": pick(order[:shown]), "harmful": pick(order[::-1][:shown])}


def study_sentences(corpus, config: WholeNetworkConfig) -> tuple[list, list, list[int], list, list]:
    """The study's sentences: (scored training sentences (the first n_train), the agreement set (their first
    n_agree), the seeded test indices, the test sentences, the validation sentences of the mean-loss query)."""
    train = corpus.splits["train"][: config.n_train] if config.n_train else corpus.splits["train"]
    g = torch.Generator().manual_seed(config.seed)
    test_idx = torch.randperm(len(corpus.splits["test"]), generator=g)[: config.n_test].tolist()
    valid = corpus.splits["valid"][: config.n_valid] if config.n_valid else corpus.splits["valid"]
    return train, train[: config.n_agree], test_idx, [corpus.splits["test"][i] for i in test_idx], valid


def _fit_set(corpus, config):
    from ..curvature.network_kfac import _fit_sentences

    return _fit_sentences(corpus.splits["train"], config.n_fit, config.seed)


def precondition(curvature, grads: torch.Tensor, damping: float, block: int = 32) -> torch.Tensor:
    """(Q, P) float32 q = (C + damping I)^{-1} g for the (Q, P) query gradients, ``block`` columns at a time (the
    float64 solve of all Q at once would hold 2 x Q x P x 8 bytes)."""
    out = torch.empty(grads.shape, dtype=torch.float32)
    for start in range(0, len(grads), block):
        out[start : start + block] = curvature.solve(grads[start : start + block].T.double(), damping).T.float()
    return out


def exact_reference(model, fit, eos: int, queries: torch.Tensor, config: WholeNetworkConfig, stages,
                    cache_dir=None) -> tuple[dict, dict]:
    """The matrix-free exact reference (issue 14, item 3) on the ``fit`` sentences.

    Lanczos extreme eigenvalues of H (largest and smallest) and of the GGN F (largest), then for each curvature of
    ``config.exact_curvatures`` and each damping of ``config.exact_dampings``: CG solves (C + lambda I) x = g of the
    validation query and the first ``n_exact`` test queries, one column at a time (each column cached, so a killed
    run resumes at the next column), each with its CG iterations and its true relative residual. H is solved only
    at dampings where H + lambda I is positive definite by the Lanczos estimate (CG's assumption); the others are
    recorded as skipped.

    Returns:
        ({(curvature key, damping): (1 + n_exact, P) float32 solutions}, results section dict).
    """
    from ..cache import ChunkCache
    from ..curvature.network_products import NetworkOperator, NetworkOperatorCurvature, extreme_eigenvalues
    from ..curvature.estimators import CurvatureProducts, lanczos_extreme

    params = dict(model.named_parameters())
    cache = (ChunkCache(cache_dir, {"stage": "whole-network exact reference", "n_fit": config.n_fit,
                                    "seed": config.seed, "cg_tol": config.cg_tol, "cg_max_iter": config.cg_max_iter,
                                    "lanczos_tol": config.lanczos_tol, "lanczos_matvecs": config.lanczos_matvecs},
                        params, fit, code=("ifutils.curvature.network_products", "ifutils.curvature.inverse"))
             if cache_dir is not None else None)
    products = CurvatureProducts(model, fit, eos)
    ops = {"H": NetworkOperator(products, "H", block=1, vectorize=False),
           "F": NetworkOperator(products, "F", block=1, vectorize=False)}
    ref = next(model.parameters())
    spectrum = cache.get("spectrum") if cache is not None else None
    if spectrum is None:
        with stages("Lanczos extreme eigenvalues (H: largest and smallest; GGN: largest)"):
            h = extreme_eigenvalues(ops["H"], products.p, ref.dtype, ref.device, tol=config.lanczos_tol,
                                    max_matvecs=config.lanczos_matvecs, seed=config.seed,
                                    dampings=config.exact_dampings)
            f = lanczos_extreme(ops["F"], products.p, "LA", ref.dtype, ref.device, config.lanczos_tol,
                                config.lanczos_matvecs, config.seed)
        spectrum = {"H": h, "F": {"lambda_max": f["value"], "lambda_max_converged": f["converged"],
                                  "matvecs": f["matvecs"]}}
        if cache is not None:
            cache.put("spectrum", spectrum)
    section = {"n_fit": len(fit), "tokens": int(sum(len(s) for s in fit)), "spectrum": spectrum, "solves": []}
    names = {"F": "ggn", "H": "hessian_cg"}
    solutions = {}
    rhs = queries[: 1 + config.n_exact]
    for damping in config.exact_dampings:  # damping-major: the cheaper (larger) dampings first
        for curvature in config.exact_curvatures:
            key = (names[curvature], float(damping))
            if curvature == "H" and not spectrum["H"]["dampings"][repr(float(damping))]["positive_definite"]:
                section["solves"].append({"curvature": names[curvature], "damping": damping, "skipped":
                                          f"H + lambda I is not positive definite (lambda_min(H) = "
                                          f"{spectrum['H']['lambda_min']:.3g})"})
                continue
            solver = NetworkOperatorCurvature(ops[curvature], "cg", name=names[curvature], trace=1.0,
                                              tol=config.cg_tol, max_iter=config.cg_max_iter)
            cols = []
            with stages(f"exact reference: CG on {names[curvature]} at lambda = {damping:g} ({len(rhs)} columns)"):
                for j in progress(range(len(rhs)), desc=f"CG {names[curvature]} lambda={damping:g}", unit="column"):
                    tag = f"cg_{curvature}_{damping!r}_{j}"
                    stored = cache.get(tag) if cache is not None else None
                    if stored is None:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore", SolverWarning)
                            x = solver.solve(rhs[j].double(), float(damping))
                        rec = solver.last_info
                        stored = {"x": x.float().cpu(), "iterations": rec["iterations"],
                                  "relative_residual": rec["max_relative_residual"], "seconds": rec["seconds"],
                                  "converged": bool(rec["solver_info"]["converged"][0])}
                        if cache is not None:
                            cache.put(tag, stored)
                    cols.append(stored)
            solutions[key] = torch.stack([c["x"] for c in cols])
            section["solves"].append({
                "curvature": names[curvature], "damping": damping, "columns": len(cols),
                "iterations": [int(c["iterations"]) for c in cols],
                "relative_residual": [float(c["relative_residual"]) for c in cols],
                "converged": [bool(c["converged"]) for c in cols],
                "seconds": [float(c["seconds"]) for c in cols]})
    return solutions, section


def _passes(columns: list, p: int, gib: float) -> list[list]:
    """Split the (key, damping, (Q, P) tensor or callable) query blocks into passes of at most ``gib`` GiB of
    float32 queries each (a block is never split)."""
    limit = max(1, int(gib * 2**30 // (4 * p)))
    out, size = [[]], 0
    for block in columns:
        q = block[3]
        if out[-1] and size + q > limit:
            out.append([])
            size = 0
        out[-1].append(block)
        size += q
    return out


def score_passes(model, sentences, eos: int, blocks: list, queries: torch.Tensor, curvatures: dict, root: Path,
                 name_parts: list, pass_gib: float, chunk_size: int, stages, what: str = "agreement") -> tuple[dict, list]:
    """Score ``sentences`` against query blocks in passes of at most ``pass_gib`` GiB of queries.

    A block is ``(curvature key, damping, x, width)``: x a (width, P) tensor of already solved queries (an exact
    reference), or None to precondition the first ``width`` rows of ``queries`` with ``curvatures[key]`` at that
    damping. Each pass streams into its own directory under ``root``, named by a fingerprint of ``name_parts``, its
    layout and the code of the modules its scores come from; a finished pass is read back without preconditioning
    anything (its scores depend on nothing else), an unfinished one resumes (:func:`ifutils.scoring.score_all`).

    Returns:
        ({(key, damping): (n, width) float32 array}, [{"dir", "columns": layout} per pass]).
    """
    from ..cache import code_version, fingerprint
    from ..scoring import load_scores

    code = code_version("ifutils.network", "ifutils.scoring", "ifutils.curvature.network_kfac",
                        "ifutils.curvature.network_products", "ifutils.curvature.estimators", "ifutils.curvature.inverse")
    p = sum(t.numel() for t in model.parameters())
    scores, passes = {}, []
    for k, group in enumerate(_passes(blocks, p, pass_gib)):
        layout = [(key, float(d), width, "exact" if x is not None else "approximation") for key, d, x, width in group]
        pass_dir = Path(root) / f"{what}_{fingerprint(name_parts, layout, code)[:12]}"
        passes.append({"dir": str(pass_dir), "columns": layout})
        with stages(f"{what} pass {k}: {len(sentences)} sentences x {sum(b[3] for b in group)} queries"):
            try:
                arr = np.asarray(load_scores(pass_dir)[0])
            except (FileNotFoundError, ValueError):
                qs = torch.cat([x if x is not None else precondition(curvatures[key], queries[:width], d)
                                for key, d, x, width in group])
                arr = np.asarray(score_all(model, sentences, eos, qs, pass_dir, chunk_size=chunk_size))
                del qs
            start = 0
            for key, d, _, width in group:
                scores[(key, d)] = arr[:, start : start + width].copy()
                start += width
    return scores, passes


def whole_network_study(model, corpus, config: WholeNetworkConfig, checkpoint, out: str | Path,
                        scores_root: str | Path = "cache/whole_scores", cache_dir: str | Path | None = "cache") -> dict:
    """Run every stage of the module docstring and write the results to ``out`` (JSON, atomically).

    Args:
        model: the trained LSTMLM (eval mode is set here). corpus: its :class:`~ifutils.data.Corpus`.
        checkpoint: the checkpoint path (recorded with its sha256). out: the results file.
        scores_root: the resumable score directories (``full/``: EK-FAC on all n_train sentences;
            ``agree<k>/``: pass k of the agreement set).
        cache_dir: cache of the factor fits, query gradients and exact solves (None: off).
    Returns:
        the results dict written.
    """
    import gc

    model = model.eval()
    eos = corpus.vocab.stoi["<eos>"]
    train, agree_set, test_idx, test, valid = study_sentences(corpus, config)
    stages, net = Stages(), NetworkGrads(model, eos)
    fit_args = dict(n_fit=config.n_fit, chunk_size=config.chunk_size, seed=config.seed, cache_dir=cache_dir)
    root = Path(scores_root)
    # score directories are named by what their scores depend on, so that a run of another configuration reuses the
    # passes it shares with this one (score_all itself refuses a directory of other weights, sentences or queries)
    from ..cache import code_version, fingerprint

    common = {"checkpoint": checkpoint_record(checkpoint)["sha256"], "n_fit": config.n_fit, "mc_samples": config.mc_samples,
              "seed": config.seed, "n_valid": config.n_valid, "n_test": config.n_test, "alpha": config.alpha,
              "chunk_size": config.chunk_size}
    results = {"config": asdict(config), "P": net.p, "n_train": len(train), "n_agree": len(agree_set),
               "n_valid": len(valid), "test_indices": test_idx, "curvatures": {}, "stages": stages.records}
    with stages("query gradients"):
        queries = query_gradients(net, valid, test, config.chunk_size, cache_dir)

    def fit(labels, again=""):
        with stages(f"KFAC + EK-FAC factors ({labels} labels{again})"):
            factors = fit_network_kfac(model, corpus.splits["train"], eos, labels=labels,
                                       mc_samples=config.mc_samples, **fit_args)
        return ekfac_network_curvature(factors), kfac_network_curvature(factors)

    # 1. every training sentence under EK-FAC (true-Fisher labels) at the default damping: the full pass, run with
    # nothing else in memory but its queries, so that its peak memory is the scoring's own
    reference = fit("model")[0]
    damping = config.alpha * reference.mean_eigenvalue()
    results["damping"] = damping
    from ..scoring import load_scores

    code = code_version("ifutils.network", "ifutils.scoring", "ifutils.curvature.network_kfac")
    full_dir = root / f"full_{fingerprint(common, config.n_train, code)[:12]}"
    try:  # a finished full pass is read back (its scores depend on nothing but its name's parts)
        full = load_scores(full_dir)[0]
    except (FileNotFoundError, ValueError):
        with stages(f"precondition (ekfac, {len(queries)} queries)"):
            full_q = precondition(reference, queries, damping)
        n_queries = len(queries)
        del reference
        if cache_dir is not None:  # the raw query gradients are read back from the cache after the pass
            del queries
        gc.collect()
        full_q = query_dict(model, full_q)  # the per-tensor layout score_all uses, so that one copy is held
        gc.collect()
        with stages(f"score all {len(train)} training sentences (ekfac x {n_queries} queries)"):
            full = score_all(model, train, eos, full_q, full_dir, chunk_size=config.chunk_size)
        del full_q
        gc.collect()
        if cache_dir is not None:
            queries = query_gradients(net, valid, test, config.chunk_size, cache_dir)
    reference = None  # freed: the curvatures of stage 2 are read back from the cache
    gc.collect()
    full = np.asarray(full)

    # 2. every curvature, and the exact reference, on the agreement set
    curvatures = {}
    for labels in ("model", "data"):
        for c in fit(labels, ", again" if labels == "model" else ""):  # "again": read back from the cache
            curvatures[c.name] = c
    for labels in ("model", "data"):
        with stages(f"diagonal Fisher ({labels} labels)"):
            c = diagonal_fisher(model, corpus.splits["train"], eos, labels=labels, mc_samples=config.mc_samples,
                                **fit_args)
        curvatures[c.name] = c
    curvatures["identity"] = IdentityCurvature(net.p, "identity")
    for key, c in curvatures.items():
        results["curvatures"][key] = {"label": label(key), "bytes": c.nbytes,
                                      "mean_eigenvalue": c.mean_eigenvalue() if key != "identity" else 1.0}
    n_sub = 1 + config.n_exact
    exact, results["exact"] = ({}, None)
    if config.exact_curvatures:
        exact, results["exact"] = exact_reference(model, _fit_set(corpus, config), eos, queries, config, stages,
                                                  cache_dir)
    grid = [damping] + [float(d) for d in config.damping_grid]
    blocks = [(key, damping, None, len(queries)) for key in curvatures]  # every query at the default damping
    blocks += [(key, d, None, n_sub) for key in curvatures for d in grid[1:]]
    blocks += [(key, d, x, len(x)) for (key, d), x in exact.items()]
    exact_setup = {"cg_tol": config.cg_tol, "cg_max_iter": config.cg_max_iter} if exact else {}
    scores, results["agreement_scores"] = score_passes(
        model, agree_set, eos, blocks, queries, curvatures, root, [common, config.n_agree, exact_setup],
        config.pass_gib, config.chunk_size, stages)
    del curvatures
    gc.collect()
    results["full_scores"] = {"dir": str(full_dir), "curvature": REFERENCE, "damping": damping,
                              "columns": ["validation"] + [f"test{i}" for i in test_idx]}
    # agreement with EK-FAC at the default damping (every test query), and with each exact reference (its queries),
    # at the reference's damping and at the curvature's best damping of the grid
    for key in results["curvatures"]:
        results["curvatures"][key]["agreement_with_ekfac"] = agreement_with_reference(
            scores[(key, damping)], scores[(REFERENCE, damping)], config.top_k, config.seed)
    results["agreement_with_exact"] = {}
    for (ref_key, ref_d) in exact:
        truth = scores[(ref_key, ref_d)]
        table = {}
        for key in dict.fromkeys(list(results["curvatures"]) + [k for k, _ in exact if k != ref_key]):
            per = {}
            for d in grid:
                if (key, d) in scores:
                    per[repr(d)] = agreement_with_reference(scores[(key, d)][:, :n_sub], truth, config.top_k,
                                                            config.seed)
            if not per:
                continue
            best = max(per, key=lambda d: per[d]["spearman"]["mean"])
            same = per.get(repr(ref_d))
            table[key] = {"label": label(key), "by_damping": per, "best_damping": float(best),
                          "at_reference_damping": same, "at_best_damping": per[best]}
        results["agreement_with_exact"][f"{ref_key}@{ref_d:g}"] = {"curvature": ref_key, "damping": ref_d,
                                                                   "table": table}
    shown_test = 1  # the first test query
    by = {k: top_sentences(scores[(k, damping)], shown_test, agree_set, corpus.vocab, config.shown)
          for k in results["curvatures"]}
    by.update({f"{k}@{d:g}": top_sentences(scores[(k, d)], shown_test, agree_set, corpus.vocab, config.shown)
               for k, d in exact})
    results["top_sentences"] = {
        "pool": f"the first {len(agree_set)} training sentences",
        "test_sentence": {"index": test_idx[0], "text": _sentence_text(corpus.vocab, test[0]), "by_curvature": by},
        "validation": {k: top_sentences(scores[(k, damping)], 0, agree_set, corpus.vocab, config.shown)
                       for k in results["curvatures"]},
        "all_training_sentences": {"pool": f"all {len(train)} training sentences", "curvature": REFERENCE,
                                   "test_sentence": top_sentences(full, shown_test, train, corpus.vocab, config.shown),
                                   "validation": top_sentences(full, 0, train, corpus.vocab, config.shown)},
    }
    results["stages"] = stages.records
    results["provenance"] = {"checkpoint": checkpoint_record(checkpoint)}
    results["environment"] = environment()
    atomic_write(out, lambda tmp: tmp.write_text(json.dumps(results, indent=1, default=float)))
    return results


def format_whole_network(results: dict) -> str:
    """Markdown: the exact-reference tables (extreme eigenvalues, solves, agreement), the agreement with EK-FAC, the
    timings, and the top sentences of the test query under each curvature."""
    lines = [f"P = {results['P']:,} parameters; queries: the mean validation loss ({results['n_valid']} sentences) and "
             f"{len(results['test_indices'])} test sentences; default damping lambda = {results['damping']:.3g} "
             f"(alpha x EK-FAC's mean eigenvalue) for every curvature."]
    if "n_agree" not in results:  # the first pass of the study (agreement with EK-FAC only)
        lines += [f"{results['n_train']:,} training sentences scored.", ""]
    else:
        lines += ["", f"**Every training sentence.** All {results['n_train']:,} training sentences scored under EK-FAC "
                  f"against the {len(results['test_indices']) + 1} queries (`{results['full_scores']['dir']}`):"]
        for name, r in results["stages"].items():
            if name.startswith("score all"):
                lines.append(f"{r['seconds']:.0f} s, peak memory {(r.get('stage_peak_mib') or r['peak_rss_mib']) / 1024:.2f} "
                             f"GiB during the stage ({name}).")
    exact = results.get("exact")
    if exact:
        h, f = exact["spectrum"]["H"], exact["spectrum"]["F"]
        lines += ["", f"**Exact reference** on the {exact['n_fit']} fit sentences ({exact['tokens']:,} tokens), "
                  f"Lanczos: lambda_max(H) = {h['lambda_max']:.4g}, lambda_min(H) = {h['lambda_min']:.3g} "
                  f"(H + lambda I positive definite for lambda > {max(0.0, -h['lambda_min']):.3g}; converged: "
                  f"{h['lambda_max_converged']}/{h['lambda_min_converged']}, {h['matvecs']['LA']}+{h['matvecs']['SA']} "
                  f"products), lambda_max(GGN) = {f['lambda_max']:.4g} ({f['matvecs']} products).", "",
                  "| solve | lambda | columns | CG iterations (min-max) | max relative residual | seconds per column |",
                  "|---|---|---|---|---|---|"]
        for sv in exact["solves"]:
            if "skipped" in sv:
                lines.append(f"| {label(sv['curvature'])} | {sv['damping']:g} | skipped: {sv['skipped']} | | | |")
            else:
                lines.append(f"| {label(sv['curvature'])} | {sv['damping']:g} | {sv['columns']} | "
                             f"{min(sv['iterations'])}-{max(sv['iterations'])} | {max(sv['relative_residual']):.1e} | "
                             f"{np.mean(sv['seconds']):.0f} |")
        for name, ref in results["agreement_with_exact"].items():
            lines += ["", f"Agreement with the exact {label(ref['curvature'])} at lambda = {ref['damping']:g} over the "
                      f"first {results['n_agree']:,} training sentences, mean over {results['config']['n_exact']} test "
                      f"queries [95% CI]:", "",
                      "| curvature | Spearman at lambda = ref. | Spearman at best lambda (which) | Pearson at best | "
                      "top-k harmful / helpful at best | validation query Spearman at best |", "|---|---|---|---|---|---|"]
            for key, r in ref["table"].items():
                same, best = r["at_reference_damping"], r["at_best_damping"]
                fmt = lambda a: f"{a['spearman']['mean']:.3f} [{a['spearman']['ci'][0]:.3f}, {a['spearman']['ci'][1]:.3f}]"  # noqa: E731
                lines.append(f"| {r['label']} | {fmt(same) if same else '-'} | {fmt(best)} ({r['best_damping']:.2g}) | "
                             f"{best['pearson']['mean']:.3f} | {best['top_k_harmful']['mean']:.2f} / "
                             f"{best['top_k_helpful']['mean']:.2f} | {best['validation']['spearman']:.3f} |")
    pool = results.get("n_agree", results["n_train"])
    lines += ["", f"Agreement with EK-FAC (true-Fisher labels) at the default damping over {pool:,} training sentences:",
              "", "| curvature | Spearman with EK-FAC [95% CI] | Pearson | top-k harmful / helpful overlap | validation "
              "query Spearman | held bytes |", "|---|---|---|---|---|---|"]
    for key, r in results["curvatures"].items():
        a = r["agreement_with_ekfac"]
        lines.append(f"| {r['label']} | {a['spearman']['mean']:.3f} [{a['spearman']['ci'][0]:.3f}, "
                     f"{a['spearman']['ci'][1]:.3f}] | {a['pearson']['mean']:.3f} | {a['top_k_harmful']['mean']:.2f} / "
                     f"{a['top_k_helpful']['mean']:.2f} | {a['validation']['spearman']:.3f} | {r['bytes'] / 2**20:,.0f} MiB |")
    top = results["top_sentences"]["test_sentence"]
    lines += ["", f"Test sentence {top['index']}: \"{top['text']}\" ({results['top_sentences'].get('pool', 'scored sentences')})", ""]
    for key, t in top["by_curvature"].items():
        name = label(key.split("@")[0]) + (f" at lambda = {key.split('@')[1]}" if "@" in key else "")
        lines.append(f"**{name}**: most helpful: " + "; ".join(
            f"\"{s['text']}\" ({s['influence']:+.2e})" for s in t["helpful"][:3]) + " ... most harmful: " + "; ".join(
            f"\"{s['text']}\" ({s['influence']:+.2e})" for s in t["harmful"][:3]))
    every = results["top_sentences"].get("all_training_sentences")
    if every:
        lines += ["", f"EK-FAC over {every['pool']}, the 10 most helpful and most harmful for the same test sentence:", "",
                  "| rank | most helpful | influence | most harmful | influence |", "|---|---|---|---|---|"]
        for k, (a, b) in enumerate(zip(every["test_sentence"]["helpful"], every["test_sentence"]["harmful"]), 1):
            lines.append(f"| {k} | {a['text']} | {a['influence']:+.2e} | {b['text']} | {b['influence']:+.2e} |")
    return "\n".join(lines)


def side_by_side(results: dict, query: str = "test_sentence", kind: str = "harmful", keys=None, width: int = 60) -> str:
    """Markdown: the ``shown`` most harmful (or helpful) training sentences of one query (``"test_sentence"`` or
    ``"validation"``), one column per curvature (``keys``, default all), rank by rank, text cut to ``width`` chars."""
    if kind not in ("harmful", "helpful"):
        raise ValueError(f"kind must be 'harmful' or 'helpful', got {kind!r}")
    top = results["top_sentences"][query]
    table = top["by_curvature"] if query == "test_sentence" else top
    keys = list(table) if keys is None else list(keys)
    name = lambda k: label(k.split("@")[0]) + (f" (lambda = {k.split('@')[1]})" if "@" in k else "")  # noqa: E731
    cut = lambda t: t if len(t) <= width else t[: width - 3] + "..."  # noqa: E731
    lines = ["| rank | " + " | ".join(name(k) for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in range(len(table[keys[0]][kind])):
        cells = [f"{cut(table[k][kind][r]['text'])} ({table[k][kind][r]['influence']:+.1e})" for k in keys]
        lines.append(f"| {r + 1} | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def n_fit_sweep(model, corpus, config: WholeNetworkConfig, n_fits, checkpoint, out: str | Path,
                scores_root: str | Path, cache_dir: str | Path | None = "cache") -> dict:
    """How EK-FAC's scores move with the number of fit sentences (issue 14, item 2), and its fit cost.

    For each n in ``n_fits`` (and ``config.n_fit``, the study's, as the reference): EK-FAC with true-Fisher labels
    fitted on n seeded training sentences (timed, with the stage's peak memory), the validation query and the first
    ``n_exact`` test queries preconditioned at its default damping (``alpha`` x its own mean eigenvalue) and at the
    first exact damping; all scored over the agreement set in one pass, with the exact GGN solutions of
    :func:`exact_reference` (read from its cache, or solved). Reported per n: Spearman and Pearson (mean over test
    queries, bootstrap interval) against the study's EK-FAC at the default damping, and against the exact GGN at its
    damping. Writes ``out`` (JSON) and returns it.
    """
    model = model.eval()
    eos = corpus.vocab.stoi["<eos>"]
    stages, net = Stages(), NetworkGrads(model, eos)
    train, agree_set, test_idx, test, valid = study_sentences(corpus, config)
    queries = query_gradients(net, valid, test, config.chunk_size, cache_dir)[: 1 + config.n_exact]
    exact_d = float(config.exact_dampings[0])
    fits = sorted(set(int(n) for n in n_fits) | {config.n_fit})
    blocks, info = [], {}
    for n in fits:
        with stages(f"EK-FAC fit, n_fit = {n}"):
            factors = fit_network_kfac(model, corpus.splits["train"], eos, labels="model", mc_samples=config.mc_samples,
                                       n_fit=n, chunk_size=config.chunk_size, seed=config.seed, cache_dir=cache_dir)
        c = ekfac_network_curvature(factors)
        d = config.alpha * c.mean_eigenvalue()
        info[n] = {"n_fit": n, "tokens": factors.tokens, "damping": d, "mean_eigenvalue": c.mean_eigenvalue(),
                   "fit": stages.records[f"EK-FAC fit, n_fit = {n}"]}
        blocks += [(n, "default", precondition(c, queries, d)), (n, "exact", precondition(c, queries, exact_d))]
        del c, factors
    solutions, _ = exact_reference(model, _fit_set(corpus, config), eos, queries, config, Stages(), cache_dir)
    ggn = solutions[("ggn", exact_d)]
    qs = torch.cat([q for *_, q in blocks] + [ggn])
    with stages(f"score {len(agree_set)} sentences x {len(qs)} queries"):
        arr = np.asarray(score_all(model, agree_set, eos, qs, Path(scores_root) / "n_fit", chunk_size=config.chunk_size))
    width = len(queries)
    cols = {(n, kind): arr[:, k * width : (k + 1) * width] for k, (n, kind, _) in enumerate(blocks)}
    truth = arr[:, len(blocks) * width :]
    rows = []
    for n in fits:
        rows.append({**info[n],
                     "vs_study_ekfac": agreement_with_reference(cols[(n, "default")], cols[(config.n_fit, "default")],
                                                                config.top_k, config.seed),
                     "vs_exact_ggn": agreement_with_reference(cols[(n, "exact")], truth, config.top_k, config.seed)})
    results = {"config": asdict(config), "n_fits": fits, "exact_damping": exact_d, "n_agree": len(agree_set),
               "rows": rows, "stages": stages.records, "provenance": {"checkpoint": checkpoint_record(checkpoint)},
               "environment": environment()}
    atomic_write(out, lambda tmp: tmp.write_text(json.dumps(results, indent=1, default=float)))
    return results


def format_n_fit(results: dict) -> str:
    """Markdown: EK-FAC's fit cost and agreement against n_fit."""
    lines = [f"EK-FAC (true-Fisher labels) fitted on n_fit seeded training sentences; scores of the first "
             f"{results['n_agree']:,} training sentences for the validation query and {results['config']['n_exact']} "
             f"test queries; Spearman mean over test queries [95% CI].", "",
             f"| n_fit | tokens | fit seconds | fit peak GiB | Spearman with n_fit = {results['config']['n_fit']} "
             f"(default damping) | Spearman with exact GGN (lambda = {results['exact_damping']:g}) |",
             "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        a, b = r["vs_study_ekfac"]["spearman"], r["vs_exact_ggn"]["spearman"]
        peak = r["fit"].get("stage_peak_mib") or r["fit"]["peak_rss_mib"]
        lines.append(f"| {r['n_fit']} | {r['tokens']:,} | {r['fit']['seconds']:.0f} | {peak / 1024:.2f} | "
                     f"{a['mean']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}] | {b['mean']:.3f} [{b['ci'][0]:.3f}, {b['ci'][1]:.3f}] |")
    return "\n".join(lines)
