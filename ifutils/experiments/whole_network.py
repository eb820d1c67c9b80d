"""Whole-network influence on the trained LSTM LM: every parameter tensor, Kronecker-factored and diagonal Fishers,
every training sentence scored against preconditioned queries, and what the scores find, shown as text.

Stages (each timed, with the process's peak resident memory after it; long ones cached or resumable):

1. curvatures fitted on ``n_fit`` training sentences (:mod:`ifutils.curvature.network_kfac`): KFAC and EK-FAC with
   true-Fisher labels (decoder in closed form, sampled labels elsewhere) and with data labels (empirical Fisher),
   the diagonal true Fisher (sampled labels) and the diagonal EF, and the identity (gradient dot product, TracIn at
   the last checkpoint);
2. query gradients (:class:`~ifutils.network.NetworkGrads`): the gradient of the mean validation loss
   L_val = (1/n_val) sum_j l_j (nats/token) as one query, and of ``n_test`` test sentences;
3. preconditioned queries q = (C + lambda I)^{-1} g_query for every curvature C, one absolute damping lambda for all
   (``alpha`` x the mean eigenvalue of EK-FAC, so that every curvature is damped alike);
4. the influence I_iq = -g_i^T q of each of the first ``n_train`` training sentences (all 42,068 by default) on each
   query, streamed to disk and resumable (:func:`ifutils.scoring.score_all`);
5. agreement of every curvature's scores with those of the EK-FAC (true-Fisher labels): Spearman and Pearson over
   training sentences per test query, mean over test queries with a percentile-bootstrap 95 % interval over test
   queries, and top-k overlap; the validation query separately;
6. the 10 most helpful (most negative I) and 10 most harmful (most positive I) training sentences, as text, for one
   test sentence and for the validation query, per curvature;
7. optionally the top of the whole-network spectrum (Lanczos lambda_max of the GGN and lambda_min/lambda_max of the
   Hessian on the first ``lanczos_n`` fit sentences, :func:`ifutils.curvature.network_products.extreme_eigenvalues`).

EK-FAC is the reference here only because it is the most faithful curvature of this pass; the matrix-free exact
reference (CG on the whole-network Hessian and GGN) is a separate, costlier stage.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from ..cache import ChunkCache
from ..config import param, validate_fields
from ..curvature.base import IdentityCurvature
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
from ..scoring import score_all


@dataclass
class WholeNetworkConfig:
    """Settings of the whole-network study; saved with its results."""

    n_fit: int = param(200, "training sentences the curvatures are fitted on (seeded draw)")
    mc_samples: int = param(1, "label draws per position for the true-Fisher factors and the diagonal true Fisher")
    n_test: int = param(20, "test sentences whose loss is explained (seeded draw)")
    n_valid: int | None = param(None, "validation sentences of the mean-validation-loss query; None: all")
    n_train: int | None = param(None, "training sentences scored (the first n_train); None: all")
    alpha: float = param(0.1, "damping lambda = alpha x EK-FAC's mean eigenvalue, the same absolute lambda for all")
    top_k: int = param(100, "size of the top sets whose overlap with EK-FAC's is reported")
    shown: int = param(10, "most helpful / most harmful sentences shown as text")
    chunk_size: int = param(32, "sentences per chunk (fitting, query gradients, scoring)")
    lanczos_n: int = param(0, "fit sentences of the Lanczos spectrum estimate; 0: skip it")
    lanczos_matvecs: int = param(40, "curvature-vector products per Lanczos run")
    seed: int = param(0, "seeds the sentence draws and the sampled labels")

    def __post_init__(self):
        validate_fields(self)
        for name in ("n_fit", "mc_samples", "n_test", "top_k", "shown", "chunk_size", "lanczos_matvecs"):
            if getattr(self, name) < 1:
                raise ValueError(f"WholeNetworkConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.alpha > 0:
            raise ValueError(f"WholeNetworkConfig.alpha must be > 0, got {self.alpha}")


REFERENCE = "ekfac"


class Stages:
    """Wall seconds and peak resident memory (MiB, of the whole process so far) after each named stage."""

    def __init__(self):
        self.records: dict[str, dict] = {}

    def __call__(self, name: str):
        stages = self

        class _Timed:
            def __enter__(self):
                print(f"[stage] {name} ...", flush=True)
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                seconds = time.perf_counter() - self.start
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                stages.records[name] = {"seconds": seconds, "peak_rss_mib": peak}
                print(f"[stage] {name} done in {seconds:.1f} s (peak memory {peak:.0f} MiB)", flush=True)

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


def whole_network_study(model, corpus, config: WholeNetworkConfig, checkpoint, out: str | Path,
                        scores_root: str | Path = "cache/whole_scores", cache_dir: str | Path | None = "cache") -> dict:
    """Run every stage of the module docstring and write the results to ``out`` (JSON, atomically).

    Args:
        model: the trained LSTMLM (eval mode is set here). corpus: its :class:`~ifutils.data.Corpus`.
        checkpoint: the checkpoint path (recorded with its sha256). out: the results file.
        scores_root: the resumable score directory (one (n_train, curvatures x queries) array).
        cache_dir: cache of the factor fits and query gradients (None: off).
    Returns:
        the results dict written.
    """
    model = model.eval()
    eos = corpus.vocab.stoi["<eos>"]
    train = corpus.splits["train"][: config.n_train] if config.n_train else corpus.splits["train"]
    g = torch.Generator().manual_seed(config.seed)
    test_idx = torch.randperm(len(corpus.splits["test"]), generator=g)[: config.n_test].tolist()
    test = [corpus.splits["test"][i] for i in test_idx]
    valid = corpus.splits["valid"][: config.n_valid] if config.n_valid else corpus.splits["valid"]
    stages, net = Stages(), NetworkGrads(model, eos)
    fit_args = dict(n_fit=config.n_fit, chunk_size=config.chunk_size, seed=config.seed, cache_dir=cache_dir)
    curvatures = {}
    for labels in ("model", "data"):
        with stages(f"KFAC + EK-FAC factors ({labels} labels)"):
            factors = fit_network_kfac(model, corpus.splits["train"], eos, labels=labels,
                                       mc_samples=config.mc_samples, **fit_args)
        for c in (ekfac_network_curvature(factors), kfac_network_curvature(factors)):
            curvatures[c.name] = c
    for labels in ("model", "data"):
        with stages(f"diagonal Fisher ({labels} labels)"):
            c = diagonal_fisher(model, corpus.splits["train"], eos, labels=labels, mc_samples=config.mc_samples,
                                **fit_args)
        curvatures[c.name] = c
    curvatures["identity"] = IdentityCurvature(net.p, "identity")
    damping = config.alpha * curvatures[REFERENCE].mean_eigenvalue()
    with stages("query gradients"):
        queries = query_gradients(net, valid, test, config.chunk_size, cache_dir)
    results = {"config": asdict(config), "P": net.p, "n_train": len(train), "n_valid": len(valid),
               "test_indices": test_idx, "damping": damping, "curvatures": {}, "stages": stages.records}
    blocks = []
    for key, c in curvatures.items():
        with stages(f"precondition ({key})"):
            blocks.append(c.solve(queries.T.double(), damping).T.float().contiguous())
        mean = c.mean_eigenvalue() if key != "identity" else 1.0
        results["curvatures"][key] = {"label": label(key), "mean_eigenvalue": mean, "bytes": c.nbytes}
    # one pass over the training sentences scores every curvature's queries: the per-sample gradients are formed
    # once, and each curvature adds (1 + n_test) columns to the product with them
    with stages(f"score {len(train)} training sentences ({len(blocks)} curvatures x {len(queries)} queries)"):
        arr = score_all(model, train, eos, torch.cat(blocks), Path(scores_root), chunk_size=config.chunk_size)
    width = len(queries)
    scores = {key: np.asarray(arr[:, k * width : (k + 1) * width]) for k, key in enumerate(curvatures)}
    results["scores"] = {"dir": str(scores_root), "columns": [f"{key}:{q}" for key in curvatures
                                                           for q in ["validation"] + [f"test{i}" for i in test_idx]]}
    for key in curvatures:
        results["curvatures"][key]["agreement_with_ekfac"] = agreement_with_reference(
            scores[key], scores[REFERENCE], config.top_k, config.seed)
    shown_test = 1  # the first test query
    results["top_sentences"] = {
        "test_sentence": {"index": test_idx[0], "text": _sentence_text(corpus.vocab, test[0]),
                          "by_curvature": {k: top_sentences(s, shown_test, train, corpus.vocab, config.shown)
                                           for k, s in scores.items()}},
        "validation": {k: top_sentences(s, 0, train, corpus.vocab, config.shown) for k, s in scores.items()},
    }
    if config.lanczos_n:
        from ..curvature.network_products import extreme_eigenvalues, network_operator

        fit = corpus.splits["train"][: config.lanczos_n]
        spectrum = {}
        for name in ("F", "H"):
            with stages(f"Lanczos ({name})"):
                op = network_operator(model, fit, eos, name)
                ref = next(model.parameters())
                spectrum[name] = extreme_eigenvalues(op, net.p, ref.dtype, ref.device, tol=1e-3,
                                                     max_matvecs=config.lanczos_matvecs, seed=config.seed,
                                                     dampings=(damping,))
        results["spectrum"] = {"n": len(fit), **spectrum}
    results["stages"] = stages.records
    results["provenance"] = {"checkpoint": checkpoint_record(checkpoint)}
    results["environment"] = environment()
    atomic_write(out, lambda tmp: tmp.write_text(json.dumps(results, indent=1, default=float)))
    return results


def format_whole_network(results: dict) -> str:
    """Markdown: the agreement table and the top sentences of the test query under each curvature."""
    lines = [f"P = {results['P']:,} parameters; {results['n_train']:,} training sentences scored against the mean "
             f"validation loss ({results['n_valid']} sentences) and {len(results['test_indices'])} test sentences; "
             f"damping lambda = {results['damping']:.3g} for every curvature.", "",
             "| curvature | Spearman with EK-FAC [95% CI] | Pearson | top-k harmful / helpful overlap | validation query "
             "Spearman | held bytes |", "|---|---|---|---|---|---|"]
    for key, r in results["curvatures"].items():
        a = r["agreement_with_ekfac"]
        lines.append(f"| {r['label']} | {a['spearman']['mean']:.3f} [{a['spearman']['ci'][0]:.3f}, "
                     f"{a['spearman']['ci'][1]:.3f}] | {a['pearson']['mean']:.3f} | {a['top_k_harmful']['mean']:.2f} / "
                     f"{a['top_k_helpful']['mean']:.2f} | {a['validation']['spearman']:.3f} | {r['bytes'] / 2**20:,.0f} MiB |")
    top = results["top_sentences"]["test_sentence"]
    lines += ["", f"Test sentence {top['index']}: \"{top['text']}\"", ""]
    for key, t in top["by_curvature"].items():
        lines.append(f"**{label(key)}**: most helpful: " + "; ".join(
            f"\"{s['text']}\" ({s['influence']:+.2e})" for s in t["helpful"][:3]) + " ... most harmful: " + "; ".join(
            f"\"{s['text']}\" ({s['influence']:+.2e})" for s in t["harmful"][:3]))
    return "\n".join(lines)
