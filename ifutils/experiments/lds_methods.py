"""Every attribution method's LDS predictions on the full-data model of the LDS study (issue 15, item 3).

For M training subsets S_m (masks W, (M, n)) and queries q (the mean validation loss, then Q validation sentences),
a method predicts the change of the query loss of a model retrained on S_m as the summed attribution of its
sentences. Every method here is linear in the training gradients, so its prediction is formed from subset sums
G = W g of one pass over the training set (:func:`ifutils.datamodels.gradient_sums`), never from the (n, Q) scores:

    curvature C at damping lambda:  f_q(S_m) = -G_m^T (C + lambda I)^{-1} g_q          (Koh & Liang 2017, eq. 2)

* ``fishers``: EK-FAC and KFAC with true-Fisher and data labels, diagonal true Fisher and EF, all from the same
  ``n_fit`` sentences as the whole-network study. For the Kronecker curvatures G and g are rotated once into the
  eigenbasis, after which every damping is a weighted dot product: -sum_k (Q^T G_m)_k (Q^T g_q)_k / (e_k + lambda);
* ``fishers_low``: the same six curvatures at :data:`LOW_DAMPINGS`, below the grid (the diagonal Fishers' LDS was
  highest at the grid's smallest damping); merged into the ``fishers`` entries of the same keys;
* ``diagonal_all``: the diagonal EF fit on every training sentence instead of ``n_fit``, at the grid and
  :data:`LOW_DAMPINGS`: whether the diagonal's LDS at small damping comes from the directions the fit sentences
  leave unexcited (zero entries);
* ``lexical``: no gradients, a control: -sum_{i in S_m} tfidf(i) . tfidf(q), the TF-IDF cosine of the training
  sentence's and the query's tokens (scikit-learn's ``TfidfVectorizer``, idf fit on the training sentences); for
  the mean-validation-loss query, the token-weighted mean over the validation sentences. How much of the LDS token
  overlap alone explains;
* ``identity``: -G_m^T g_q (TracIn at the last checkpoint, Pruthi et al. 2020; any damping only rescales it);
* ``cosine``: -sum_{i in S_m} cos(g_i, g_q) (unit-norm sums of the same pass);
* ``trak``: TRAK-style (Park et al. 2023, eq. 13 with loss gradients and one model): phi = P g with a Kronecker
  random projection (:class:`~ifutils.datamodels.KroneckerProjection`), f_q(S_m) = -(sum_{i in S_m} phi_i)^T
  (Phi^T Phi / n + lambda I)^{-1} phi_q;
* ``tracin``: TracIn over the checkpoints of the full-data model's training (Pruthi et al. 2020, eq. 3):
  -sum_k eta_k G_m^{(k)T} g_q^{(k)}, eta_k the epoch's learning rate, gradients at checkpoint k;
* ``subset``: today's 512-coordinate subset (``default_subset(model, "recurrent")``) with its exact Hessian on the
  fit sentences: -G_m[S]^T (H_S + lambda I)^{-1} g_q[S], what the sliver of the subset study sees;
* ``arnoldi``: the top-``arnoldi_rank`` Ritz pairs of the whole-network GGN and Hessian on the fit sentences
  (Schioppa et al. 2022, Alg. 1, projection onto the Ritz vectors): -(V^T G_m)^T diag(1 / (e + lambda)) V^T g_q;
* ``cg``: the exact GGN and Hessian inverses by multi-shift CG (:func:`~ifutils.curvature.multishift.multishift_cg`,
  every damping from one Krylov run per query; the Hessian only at dampings where H + lambda I is positive
  definite by Lanczos), on the validation query and the first ``n_solver_queries`` sentence queries;
* ``lissa``: the Hessian by LiSSA with mini-batch products (Agarwal et al. 2017; Koh & Liang 2017, sec. 3), the
  same queries, positive definite dampings only.

Dampings: every curvature method at the study's default lambda_0 = alpha x the mean eigenvalue of EK-FAC (the one
absolute damping of the whole-network study) and at each absolute damping of ``dampings``; TRAK at alpha x the mean
eigenvalue of its projected kernel and the same absolute grid.

Each group's predictions are cached under its own key (its code, the model's weights, the masks and queries and
the configuration), so a killed run redoes at most the group it was in (CG and LiSSA cache every query column).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..cache import ChunkCache
from ..config import param, validate_fields
from ..curvature.inverse import SolverWarning
from ..datamodels import GradientSums, KroneckerProjection, fingerprint_weights, gradient_sums
from ..network import NetworkGrads
from ..progress import log, progress

GROUPS = ("identity", "cosine", "fishers", "fishers_low", "lexical", "trak", "subset", "arnoldi", "diagonal_all",
          "kronecker_all", "tracin", "lissa", "cg")
"""Method groups, cheapest first (the order they run in; CG, about 100 products per query column, last)."""


LOW_DAMPINGS = (1e-12, 1e-11, 1e-10, 1e-9, 1e-8, 1e-7)
"""Absolute dampings of the ``fishers_low`` group, below the sweep of ``MethodsConfig.dampings`` (a module constant
in that group's cache key, not a config field, so that the other groups' keys stay as they were)."""

GROUP_KEYS = {g: {"low_dampings": LOW_DAMPINGS} for g in ("fishers_low", "diagonal_all", "kronecker_all")}
"""Settings outside :class:`MethodsConfig` that a group's cache key covers."""


@dataclass
class MethodsConfig:
    """How the LDS predictions are formed (saved with the results)."""

    n_queries: int = param(100, "validation sentences whose retrained losses are predicted (with the mean validation loss)")
    dampings: tuple[float, ...] = param((1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0),
                                        "absolute dampings of the sweep (5 decades), besides each default")
    groups: tuple[str, ...] = param(GROUPS, "method groups to run (module docstring)")
    n_solver_queries: int = param(20, "sentence queries (the first of n_queries) solved by CG and LiSSA")
    cg_tol: float = param(1e-4, "multi-shift CG stops a damping at this relative residual")
    cg_max_iter: int = param(100, "curvature products per query column at most (CG)")
    arnoldi_rank: int = param(50, "Ritz pairs kept (Krylov dimension 2 x rank)")
    lissa_depth: int = param(200, "LiSSA recursion steps")
    lissa_batch: int = param(8, "fit sentences per stochastic Hessian product of LiSSA")
    k_out: int = param(32, "TRAK projection: rows of each tensor's gradient projected to this many")
    k_in: int = param(32, "TRAK projection: columns projected to this many")
    subset_coords: int = param(512, "coordinates of the subset method (the subset study's)")

    def __post_init__(self):
        validate_fields(self)
        if unknown := [g for g in self.groups if g not in GROUPS]:
            raise ValueError(f"unknown method groups {unknown}; choose from {', '.join(GROUPS)}")
        if any(not d > 0 for d in self.dampings) or len(set(self.dampings)) != len(self.dampings):
            raise ValueError(f"dampings must be distinct and > 0, got {self.dampings}")
        for name in ("n_queries", "n_solver_queries", "cg_max_iter", "arnoldi_rank", "lissa_depth", "lissa_batch",
                     "k_out", "k_in", "subset_coords"):
            if getattr(self, name) < 1:
                raise ValueError(f"MethodsConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_solver_queries > self.n_queries:
            raise ValueError(f"n_solver_queries={self.n_solver_queries} exceeds n_queries={self.n_queries}")


class Context:
    """What the method groups share, computed once and on demand: the query gradients, the gradient sums of the
    training set, the fit sentences, the default damping, the Lanczos spectrum."""

    def __init__(self, model, corpus, masks: np.ndarray, queries: list[int], config: MethodsConfig, wconfig,
                 checkpoints: list[tuple[str, float]], cache_dir, stages, archive_dir=None):
        from ..curvature.network_kfac import _fit_sentences

        self.model, self.corpus, self.masks, self.queries = model.eval(), corpus, masks, queries
        self.config, self.wconfig, self.checkpoints, self.stages = config, wconfig, checkpoints, stages
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.archive_dir = None if archive_dir is None else Path(archive_dir)
        self.eos = corpus.vocab.stoi["<eos>"]
        self.train = corpus.splits["train"][: masks.shape[1]]
        self.valid = corpus.splits["valid"]
        self.fit = _fit_sentences(self.train, wconfig.n_fit, wconfig.seed)
        self.net = NetworkGrads(self.model, self.eos)
        self.masks_key = fingerprint_weights(masks)
        self._grads = self._sums = self._default = self._spectrum = None

    @property
    def query_grads(self) -> torch.Tensor:
        """(1 + Q, P) float32: the mean-validation-loss gradient, then each query sentence's."""
        if self._grads is None:
            from .whole_network import query_gradients

            with self.stages("query gradients"):
                self._grads = query_gradients(self.net, self.valid, [self.valid[i] for i in self.queries],
                                              self.wconfig.chunk_size, self.cache_dir)
        return self._grads

    def projection(self) -> KroneckerProjection:
        return KroneckerProjection(self.net.shapes, self.config.k_out, self.config.k_in, seed=self.wconfig.seed)

    @property
    def sums(self) -> GradientSums:
        """Subset sums, unit-norm sums, squared norms and projected features of the training gradients (cached)."""
        if self._sums is None:
            cache = self.cache("gradient sums", ["ifutils.datamodels"],
                               {"k_out": self.config.k_out, "k_in": self.config.k_in})
            stored = cache.get("sums") if cache is not None else None
            if stored is None:
                with self.stages(f"gradient sums over {len(self.train)} sentences ({len(self.masks)} subsets)"):
                    out = gradient_sums(self.net, self.train, self.masks, self.wconfig.chunk_size, self.projection())
                stored = {"sums": out.sums.float(), "sq_norms": out.sq_norms, "features": out.features, "n": out.n,
                          "tokens": out.tokens}
                out.sums = None
                stored["unit_sums"] = out.unit_sums.float()
                del out
                if cache is not None:
                    cache.put("sums", stored)
            self._sums = GradientSums(stored["sums"], stored["unit_sums"], stored["sq_norms"],  # float32: 2 x 4 M P bytes
                                      stored["features"], int(stored["n"]), int(stored["tokens"]))
        return self._sums

    @property
    def default_damping(self) -> float:
        """lambda_0 = alpha x the mean eigenvalue of EK-FAC (true-Fisher labels) on the fit sentences."""
        if self._default is None:
            self._default = self._kept("default_damping", lambda: self.wconfig.alpha * self.kfac_curvatures(
                "model")["ekfac"].mean_eigenvalue())
        return self._default

    def _kept(self, name: str, compute):
        """``compute()`` (a JSON value that depends on the model and the whole-network settings only), kept in
        ``archive_dir / f"{name}.json"`` beside the archived predictions, so that a fresh clone whose groups are all
        archived neither refits EK-FAC for the default damping nor reruns Lanczos."""
        if self.archive_dir is None:
            return compute()
        from ..io import atomic_write, weights_sha256

        path = self.archive_dir / f"{name}.json"
        description = json.loads(json.dumps({"weights": weights_sha256(self.model)[:16], "version": ARCHIVE_VERSION,
                                             "whole_network": asdict(self.wconfig)}, default=float))
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored["description"] == description:
                return stored["value"]
        value = compute()
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps({"description": description, "value": value},
                                                                 indent=1, default=float)))
        return value

    def kfac_curvatures(self, labels: str) -> dict:
        from ..curvature.network_kfac import ekfac_network_curvature, fit_network_kfac, kfac_network_curvature

        w = self.wconfig
        with self.stages(f"KFAC + EK-FAC factors ({labels} labels)"):
            factors = fit_network_kfac(self.model, self.train, self.eos, labels=labels, mc_samples=w.mc_samples,
                                       n_fit=w.n_fit, chunk_size=w.chunk_size, seed=w.seed, cache_dir=self.cache_dir)
        return {c.name: c for c in (ekfac_network_curvature(factors), kfac_network_curvature(factors))}

    @property
    def spectrum(self) -> dict:
        """Lanczos extreme eigenvalues of H and the GGN on the fit sentences (the whole-network study's, cached)."""
        if self._spectrum is None:
            from dataclasses import replace

            from .whole_network import exact_reference

            config = replace(self.wconfig, exact_curvatures=(), n_exact=0)
            self._spectrum = self._kept("spectrum", lambda: exact_reference(
                self.model, self.fit, self.eos, self.query_grads[:1], config, self.stages, self.cache_dir)[1]["spectrum"])
        return self._spectrum

    def h_positive_definite(self, damping: float) -> bool:
        """H + damping I positive definite by the Lanczos estimate (with its accuracy margin)."""
        lmin = self.spectrum["H"]["lambda_min"]
        return bool(lmin + damping > self.wconfig.lanczos_tol * abs(lmin))

    def cache(self, stage: str, code: list, extra: dict | None = None) -> ChunkCache | None:
        """The cache of one stage: keyed by ``code``, the model's weights, the masks, the queries and the configs."""
        if self.cache_dir is None:
            return None
        description = {"stage": f"lds: {stage}", "masks": self.masks_key, "queries": self.queries,
                       "n_fit": self.wconfig.n_fit, "seed": self.wconfig.seed, "mc_samples": self.wconfig.mc_samples,
                       "chunk_size": self.wconfig.chunk_size, "alpha": self.wconfig.alpha, **(extra or {})}
        return ChunkCache(self.cache_dir, description, dict(self.model.named_parameters()), code=tuple(code))

    def dampings(self) -> list[float]:
        return [self.default_damping, *map(float, self.config.dampings)]


def _dot(a: torch.Tensor, b: torch.Tensor, block: int = 1 << 19) -> torch.Tensor:
    """a b^T in float64 for a (k, P), b (l, P) of any float dtype, P in column blocks (no float64 copy of a)."""
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64)
    for start in range(0, a.shape[1], block):
        out += a[:, start : start + block].double() @ b[:, start : start + block].double().T
    return out


def _as_rows(pred: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(pred.double().cpu() if torch.is_tensor(pred) else pred, dtype=np.float64)


def _weighted(left: torch.Tensor, right: torch.Tensor, weights: torch.Tensor, block: int = 1 << 19) -> np.ndarray:
    """-(left^T diag(weights) right) in float64, P in row blocks: left (P, M), right (P, Q), weights (P,) -> (M, Q)."""
    out = torch.zeros(left.shape[1], right.shape[1], dtype=torch.float64)
    for start in range(0, left.shape[0], block):
        sl = slice(start, start + block)
        out -= (left[sl].double() * weights[sl, None].double()).T @ right[sl].double()
    return out.numpy()


# ------------------------------------------------------------------------------------------------- method groups
# Each returns {key: {"dampings": [float or None], "pred": (D, M, W) array, "meta": dict}}.


def group_identity(ctx: Context) -> dict:
    """The gradient dot product (TracIn at the last checkpoint); damping-free."""
    pred = -_dot(ctx.sums.sums, ctx.query_grads)
    return {"identity": {"dampings": [None], "pred": _as_rows(pred)[None], "meta": {}}}


def group_cosine(ctx: Context) -> dict:
    """The gradient cosine, -sum_{i in S} cos(g_i, g_q) (the query's norm divided out)."""
    q = ctx.query_grads.double()
    pred = -_dot(ctx.sums.unit_sums, q / q.norm(dim=1, keepdim=True))
    return {"cosine": {"dampings": [None], "pred": _as_rows(pred)[None], "meta": {}}}


def group_fishers(ctx: Context) -> dict:
    """KFAC / EK-FAC (both labels) by one rotation into their eigenbasis; the diagonal Fishers directly."""
    from ..curvature.network_kfac import diagonal_fisher

    w, out = ctx.wconfig, {}
    dampings = ctx.dampings()
    sums_t, q_t = ctx.sums.sums.T, ctx.query_grads.T  # (P, M), (P, 1 + Q), float32
    for labels in ("model", "data"):
        curvatures = ctx.kfac_curvatures(labels)
        first = next(iter(curvatures.values()))
        with ctx.stages(f"rotate the subset sums and queries into the KFAC eigenbasis ({labels} labels)"):
            rs = first.to_eigenbasis(sums_t).float()
            rq = first.to_eigenbasis(q_t).float()
        for key, c in curvatures.items():
            e = c.eigenvalue_vector()
            out[key] = {"dampings": dampings, "meta": {"mean_eigenvalue": c.mean_eigenvalue()},
                        "pred": np.stack([_weighted(rs, rq, 1 / (e + d)) for d in dampings])}
        del rs, rq
        with ctx.stages(f"diagonal Fisher ({labels} labels)"):
            diag = diagonal_fisher(ctx.model, ctx.train, ctx.eos, labels=labels, mc_samples=w.mc_samples, n_fit=w.n_fit,
                                   chunk_size=w.chunk_size, seed=w.seed, cache_dir=ctx.cache_dir)
        out[diag.name] = {"dampings": dampings, "meta": {"mean_eigenvalue": diag.mean_eigenvalue()},
                          "pred": np.stack([_as_rows(-_dot(ctx.sums.sums, ctx.query_grads / (diag.d + d).float()))
                                            for d in dampings])}
    return out


def group_fishers_low(ctx: Context) -> dict:
    """The ``fishers`` group's six curvatures (their fits read back from the cache) at :data:`LOW_DAMPINGS` not
    already among the study's dampings, in float64: -(B^T G_m)^T diag(1 / (e + lambda)) (B^T g_q) with B the
    Kronecker eigenbasis and e its eigenvalues, or B = I and e = the diagonal. As lambda falls below a curvature's
    small eigenvalues (directions the fit sentences barely excite, such as the embedding rows of words absent from
    them), those directions dominate the prediction. A damping with e_min + lambda <= 0 is skipped and listed in
    ``meta["skipped_not_positive_definite"]``."""
    from ..curvature.network_kfac import diagonal_fisher

    w, out = ctx.wconfig, {}
    dampings = [d for d in LOW_DAMPINGS if not any(math.isclose(d, e, rel_tol=1e-9) for e in ctx.dampings())]
    sums_t, q_t = ctx.sums.sums.T, ctx.query_grads.T  # (P, M), (P, 1 + Q)

    def predict(key, left, right, e):
        e_min = float(e.min())
        kept = [d for d in dampings if e_min + d > 0]
        out[key] = {"dampings": kept, "pred": np.stack([_weighted(left, right, 1 / (e + d)) for d in kept]),
                    "meta": {"min_eigenvalue": e_min, "zero_eigenvalues": int((e == 0).sum()),
                             "skipped_not_positive_definite": [d for d in dampings if d not in kept]}}

    for labels in ("model", "data"):
        curvatures = ctx.kfac_curvatures(labels)
        basis = next(iter(curvatures.values()))
        with ctx.stages(f"rotate the subset sums and queries into the KFAC eigenbasis ({labels} labels, low dampings)"):
            left, right = basis.to_eigenbasis(sums_t).float(), basis.to_eigenbasis(q_t).float()
        for key, c in curvatures.items():
            predict(key, left, right, c.eigenvalue_vector())
        del left, right
        diag = diagonal_fisher(ctx.model, ctx.train, ctx.eos, labels=labels, mc_samples=w.mc_samples, n_fit=w.n_fit,
                               chunk_size=w.chunk_size, seed=w.seed, cache_dir=ctx.cache_dir)
        predict(diag.name, sums_t, q_t, diag.d)
    return out


def group_diagonal_all(ctx: Context) -> dict:
    """The diagonal EF on all the training sentences (``n_fit=None``; same scale, (1/n) sum_i T_i g_i^2), at the
    study's dampings and :data:`LOW_DAMPINGS`, in float64: -G_m^T (D + lambda I)^{-1} g_q."""
    from ..curvature.network_kfac import diagonal_fisher

    w = ctx.wconfig
    with ctx.stages(f"diagonal EF on all {len(ctx.train):,} training sentences"):
        diag = diagonal_fisher(ctx.model, ctx.train, ctx.eos, labels="data", n_fit=None, chunk_size=w.chunk_size,
                               seed=w.seed, cache_dir=ctx.cache_dir)
    dampings = [*ctx.dampings(), *(d for d in LOW_DAMPINGS
                                   if not any(math.isclose(d, e, rel_tol=1e-9) for e in ctx.dampings()))]
    sums_t, q_t = ctx.sums.sums.T, ctx.query_grads.T
    pred = np.stack([_weighted(sums_t, q_t, 1 / (diag.d + d)) for d in dampings])
    meta = {"mean_eigenvalue": diag.mean_eigenvalue(), "n_fit": len(ctx.train),
            "zero_eigenvalues": int((diag.d == 0).sum())}
    return {"ef_all_diag": {"dampings": dampings, "pred": pred, "meta": meta}}


def group_lexical(ctx: Context) -> dict:
    """TF-IDF cosine between each training sentence and each query (tokens without ``<eos>``), summed over the
    subset: the prediction of a model that only counts shared (rare) words."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    def docs(sentences):
        return [[str(t) for t in s.tolist() if t != ctx.eos] for s in sentences]

    tfidf = TfidfVectorizer(analyzer=lambda doc: doc)  # l2-normalised rows: a dot product is the cosine
    train = tfidf.fit_transform(docs(ctx.train))
    valid = tfidf.transform(docs(ctx.valid))
    tokens = np.array([len(d) for d in docs(ctx.valid)], dtype=np.float64)
    mean_query = valid.T @ (tokens / tokens.sum())  # (V,): the token-weighted mean of the validation sentences
    sims = np.column_stack([train @ mean_query, (train @ valid[ctx.queries].T).toarray()])  # (n, 1 + Q)
    pred = -(ctx.masks.astype(np.float64) @ sims)
    return {"tfidf": {"dampings": [None], "pred": pred[None], "meta": {"vocabulary": len(tfidf.vocabulary_)}}}


def group_trak(ctx: Context) -> dict:
    """TRAK-style: projected features, the projected EF kernel Phi^T Phi / n, solved by its eigendecomposition."""
    phi = ctx.sums.features.double()  # (n, K)
    kernel = phi.T @ phi / len(phi)
    evals, evecs = torch.linalg.eigh(kernel)
    evals = evals.clamp_min(0.0)
    phi_q = ctx.projection()(ctx.query_grads).double()  # (1 + Q, K)
    subset = torch.as_tensor(ctx.masks, dtype=torch.float64) @ phi  # (M, K)
    default = ctx.wconfig.alpha * float(evals.mean())
    dampings = [default, *map(float, ctx.config.dampings)]
    left, right = evecs.T @ subset.T, evecs.T @ phi_q.T
    pred = np.stack([_weighted(left, right, 1 / (evals + d)) for d in dampings])
    meta = {"dim": int(phi.shape[1]), "k_out": ctx.config.k_out, "k_in": ctx.config.k_in, "default_damping": default,
            "mean_eigenvalue": float(evals.mean()), "lambda_max": float(evals.max())}
    return {"trak": {"dampings": dampings, "pred": pred, "meta": meta}}


def group_subset(ctx: Context) -> dict:
    """The subset study's sliver: exact Hessian of 512 coordinates of the last LSTM layer's W_hh."""
    from ..curvature.exact import hessian_and_ggn
    from ..subset import SubsetLoss, default_subset

    subset = default_subset(ctx.model, "recurrent", ctx.config.subset_coords, seed=ctx.wconfig.seed)
    offsets, start = {}, 0
    for name, shape in ctx.net.shapes.items():
        offsets[name] = start
        start += math.prod(shape)
    idx = torch.cat([offsets[n] + subset.indices[n] for n in subset.names])
    loss = SubsetLoss(ctx.model, subset, ctx.eos, dtype=torch.float64)
    with ctx.stages(f"subset Hessian ({subset.size} coordinates, {len(ctx.fit)} sentences)"):
        hess = hessian_and_ggn(loss, ctx.fit)[0]
    evals = hess.eigvalsh()
    dampings = ctx.dampings()
    g = ctx.query_grads.double()[:, idx].T  # (p, 1 + Q)
    sums = ctx.sums.sums[:, idx]
    pred, kept = [], []
    for d in dampings:
        if bool((evals + d).abs().min() <= 1e-12 * evals.abs().max()):
            continue  # singular at this damping
        pred.append(_as_rows(-(sums.double() @ hess.solve(g, d))))
        kept.append(d)
    meta = {"p": subset.size, "lambda_min": float(evals[0]), "lambda_max": float(evals[-1]),
            "positive_definite": {repr(d): bool(evals[0] + d > 0) for d in kept}}
    return {"subset_hessian": {"dampings": kept, "pred": np.stack(pred), "meta": meta}}


def group_tracin(ctx: Context) -> dict:
    """TracIn over the checkpoints ``ctx.checkpoints`` [(path, learning rate)]: one gradient pass each, cached."""
    from ..io import load_checkpoint
    from .whole_network import query_gradients

    total, used = 0.0, []
    for k, (path, lr) in enumerate(progress(ctx.checkpoints, desc="TracIn checkpoints", unit="checkpoint")):
        model, _, _ = load_checkpoint(path, next(ctx.model.parameters()).device)
        model.eval()
        if all(torch.equal(a, b.to(a)) for a, b in zip(model.parameters(), ctx.model.parameters())):
            total = total + lr * torch.as_tensor(group_identity(ctx)["identity"]["pred"][0])  # the model scored
            used.append({"checkpoint": str(path), "lr": lr, "same_as_scored_model": True})
            continue
        cache = (ChunkCache(ctx.cache_dir, {"stage": "lds: tracin checkpoint", "masks": ctx.masks_key,
                                            "queries": ctx.queries, "chunk_size": ctx.wconfig.chunk_size},
                            dict(model.named_parameters()), code=("ifutils.datamodels",))
                 if ctx.cache_dir is not None else None)
        stored = cache.get("pred") if cache is not None else None
        if stored is None:
            net = NetworkGrads(model, ctx.eos)
            with ctx.stages(f"TracIn checkpoint {k + 1}/{len(ctx.checkpoints)}"):
                q = query_gradients(net, ctx.valid, [ctx.valid[i] for i in ctx.queries], ctx.wconfig.chunk_size)
                sums = gradient_sums(net, ctx.train, ctx.masks, ctx.wconfig.chunk_size, desc=f"TracIn pass {k + 1}")
                stored = -(sums.sums @ q.double().T)
            del sums
            if cache is not None:
                cache.put("pred", stored)
        total = total + lr * stored.double()
        used.append({"checkpoint": str(path), "lr": lr})
    return {"tracin": {"dampings": [None], "pred": _as_rows(total)[None], "meta": {"checkpoints": used}}}


class _Counted:
    """A matvec that advances a progress bar by the columns it multiplies, so that a long solve (Arnoldi, CG) shows
    its products as they happen; values unchanged."""

    def __init__(self, mv, total: int, desc: str):
        self.mv, self.bar = mv, progress(total=total, desc=desc, unit="product")

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        out = self.mv(v)
        self.bar.update(1 if v.dim() == 1 else v.shape[1])
        return out

    def close(self) -> None:
        self.bar.close()


def _operator(ctx: Context, curvature: str, total: int | None = None, desc: str | None = None):
    """The whole-network ``curvature`` ("F" or "H") on the fit sentences; with ``total``, counted on a progress bar."""
    from ..curvature.estimators import CurvatureProducts
    from ..curvature.network_products import NetworkOperator

    op = NetworkOperator(CurvatureProducts(ctx.model, ctx.fit, ctx.eos), curvature, block=1, vectorize=False)
    return op if total is None else _Counted(op, total, desc or f"{curvature} products")


def group_arnoldi(ctx: Context) -> dict:
    """Top Ritz pairs of the GGN and of H (Schioppa et al. 2022), cached; every damping from one projection."""
    from ..curvature.inverse import arnoldi

    rank, out = ctx.config.arnoldi_rank, {}
    dampings = ctx.dampings()
    for curvature, key in (("F", f"ggn_arnoldi_r{rank}"), ("H", f"arnoldi_r{rank}")):
        cache = ctx.cache(f"arnoldi {curvature}", ["ifutils.curvature.inverse", "ifutils.curvature.network_products"],
                          {"rank": rank})
        stored = cache.get("ritz") if cache is not None else None
        if stored is None:
            with ctx.stages(f"Arnoldi on {key} ({2 * rank} products)"), warnings.catch_warnings():
                warnings.simplefilter("ignore", SolverWarning)
                op = _operator(ctx, curvature, 3 * rank, f"Arnoldi {key}")  # 2 rank iterations + rank checks
                evals, evecs, info = arnoldi(op, ctx.net.p, rank, 2 * rank, ctx.wconfig.seed)
                op.close()
            stored = {"evals": evals, "evecs": evecs.float(), "ritz_residual": torch.tensor(info["ritz_residual"])}
            if cache is not None:
                cache.put("ritz", stored)
        evals, v = stored["evals"].double(), stored["evecs"].double()
        left, right = _dot(v.T, ctx.sums.sums), _dot(v.T, ctx.query_grads)
        kept = [d for d in dampings if bool((evals + d).abs().min() > 1e-12)]
        out[key] = {"dampings": kept, "pred": np.stack([_weighted(left, right, 1 / (evals + d)) for d in kept]),
                    "meta": {"rank": rank, "ritz_values": evals.tolist(),
                             "ritz_residual_max": float(stored["ritz_residual"].max())}}
    return out


def _solver_columns(ctx: Context) -> torch.Tensor:
    return ctx.query_grads[: 1 + ctx.config.n_solver_queries].double()


def group_cg(ctx: Context) -> dict:
    """Multi-shift CG on the GGN (every damping) and on H (positive definite dampings), one cached column at a time."""
    from ..curvature.multishift import multishift_cg

    out, cols = {}, _solver_columns(ctx)
    for curvature, key in (("F", "ggn"), ("H", "hessian_cg")):
        dampings = ctx.dampings() if curvature == "F" else [d for d in ctx.dampings() if ctx.h_positive_definite(d)]
        skipped = [d for d in ctx.dampings() if d not in dampings]
        if not dampings:
            continue
        op = _operator(ctx, curvature, len(cols) * (ctx.config.cg_max_iter + len(dampings)), f"CG products ({key})")
        cache = ctx.cache(f"multishift cg {curvature}", ["ifutils.curvature.multishift",
                                                          "ifutils.curvature.network_products"],
                          {"dampings": dampings, "tol": ctx.config.cg_tol, "max_iter": ctx.config.cg_max_iter})
        solutions, records = {d: [] for d in dampings}, []
        for j in progress(range(len(cols)), desc=f"multi-shift CG ({key})", unit="column"):
            stored = cache.get(f"col{j}") if cache is not None else None
            if stored is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", SolverWarning)
                    xs, info = multishift_cg(op, cols[j], dampings, ctx.config.cg_tol, ctx.config.cg_max_iter)
                stored = {"x": torch.stack([xs[d] for d in dampings]).float(), "info": json.dumps(info)}
                if cache is not None:
                    cache.put(f"col{j}", stored)
            for k, d in enumerate(dampings):
                solutions[d].append(stored["x"][k].double())
            records.append(json.loads(stored["info"]))
        pred = np.stack([_as_rows(-_dot(ctx.sums.sums, torch.stack(solutions[d]))) for d in dampings])
        per = {repr(d): {"iterations": [r[repr(d)]["iterations"][0] for r in records],
                         "true_residual": [r[repr(d)]["true_residual"][0] for r in records],
                         "converged": [r[repr(d)]["converged"][0] for r in records]} for d in dampings}
        out[key] = {"dampings": dampings, "pred": pred,
                    "meta": {"columns": len(cols), "solves": per, "seconds": [r["seconds"] for r in records],
                             "skipped_not_positive_definite": skipped}}
    return out


def group_lissa(ctx: Context) -> dict:
    """LiSSA on H with mini-batch Hessian products, at the dampings where H + lambda I is positive definite."""
    from ..curvature.estimators import CurvatureProducts
    from ..curvature.inverse import lissa

    cfg, cols = ctx.config, _solver_columns(ctx)
    dampings = [d for d in ctx.dampings() if ctx.h_positive_definite(d)]
    if not dampings:
        return {}
    b = cfg.lissa_batch
    batches = [CurvatureProducts(ctx.model, ctx.fit[i : i + b], ctx.eos) for i in range(0, len(ctx.fit) - b + 1, b)]

    def sample_mv(v, generator):
        product = batches[int(torch.randint(len(batches), (1,), generator=generator))]
        cols_ = v if v.dim() == 2 else v[:, None]
        out = torch.stack([product.hessian_vp(c.to(product.params[product.names[0]].dtype)).double()
                           for c in cols_.T], 1)
        return out if v.dim() == 2 else out[:, 0]

    lmax = ctx.spectrum["H"]["lambda_max"]
    cache = ctx.cache("lissa H", ["ifutils.curvature.inverse", "ifutils.curvature.estimators"],
                      {"dampings": dampings, "depth": cfg.lissa_depth, "batch": b})
    pred, meta = [], {"depth": cfg.lissa_depth, "batch": b, "scales": {}, "diverged": {}}
    for d in dampings:
        scale = 2 * (lmax + d)  # above half of a mini-batch's largest eigenvalue up to 4 x the full set's
        xs, diverged = [], []
        for j in progress(range(len(cols)), desc=f"LiSSA lambda={d:g}", unit="column"):
            stored = cache.get(f"{d!r}_{j}") if cache is not None else None
            if stored is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", SolverWarning)
                    x, info = lissa(None, cols[j], d, scale, cfg.lissa_depth, sample_mv=sample_mv,
                                    seed=ctx.wconfig.seed + j)
                stored = {"x": x.float(), "diverged": bool(info["diverged"])}
                if cache is not None:
                    cache.put(f"{d!r}_{j}", stored)
            xs.append(stored["x"].double())
            diverged.append(bool(stored["diverged"]))
        pred.append(_as_rows(-_dot(ctx.sums.sums, torch.stack(xs))))
        meta["scales"][repr(d)], meta["diverged"][repr(d)] = scale, diverged
    return {"hessian_lissa": {"dampings": dampings, "pred": np.stack(pred), "meta": meta}}


def group_kronecker_all(ctx: Context) -> dict:
    """EK-FAC and KFAC (true-Fisher labels) fit on all the training sentences (``n_fit=None``) instead of ``n_fit``:
    the like-for-like comparison with ``diagonal_all``. At the study's dampings and :data:`LOW_DAMPINGS`, from one
    rotation into their eigenbasis, float64 weights: -(Q^T G_m)^T diag(1 / (e + lambda)) (Q^T g_q). A damping with
    e_min + lambda <= 0 is skipped and listed in ``meta["skipped_not_positive_definite"]``."""
    from ..curvature.network_kfac import ekfac_network_curvature, fit_network_kfac, kfac_network_curvature

    w = ctx.wconfig
    with ctx.stages(f"KFAC + EK-FAC factors on all {len(ctx.train):,} training sentences (model labels)"):
        factors = fit_network_kfac(ctx.model, ctx.train, ctx.eos, labels="model", mc_samples=w.mc_samples,
                                   n_fit=None, chunk_size=w.chunk_size, seed=w.seed, cache_dir=ctx.cache_dir)
    curvatures = [ekfac_network_curvature(factors), kfac_network_curvature(factors)]
    dampings = [*ctx.dampings(), *(d for d in LOW_DAMPINGS
                                   if not any(math.isclose(d, e, rel_tol=1e-9) for e in ctx.dampings()))]
    with ctx.stages("rotate the subset sums and queries into the eigenbasis of the all-sentence KFAC"):
        left = curvatures[0].to_eigenbasis(ctx.sums.sums.T).float()
        right = curvatures[0].to_eigenbasis(ctx.query_grads.T).float()
    out = {}
    for c in curvatures:
        e = c.eigenvalue_vector()
        e_min = float(e.min())
        kept = [d for d in dampings if e_min + d > 0]
        out[f"{c.name}_all"] = {
            "dampings": kept, "pred": np.stack([_weighted(left, right, 1 / (e + d)) for d in kept]),
            "meta": {"mean_eigenvalue": c.mean_eigenvalue(), "n_fit": len(ctx.train), "min_eigenvalue": e_min,
                     "zero_eigenvalues": int((e == 0).sum()),
                     "skipped_not_positive_definite": [d for d in dampings if d not in kept]}}
    return out


GROUP_FUNCTIONS = {"identity": group_identity, "cosine": group_cosine, "fishers": group_fishers,
                   "fishers_low": group_fishers_low, "lexical": group_lexical, "diagonal_all": group_diagonal_all,
                   "trak": group_trak,
                   "subset": group_subset, "tracin": group_tracin, "arnoldi": group_arnoldi, "cg": group_cg,
                   "lissa": group_lissa, "kronecker_all": group_kronecker_all}


ARCHIVE_VERSION = 1
"""Part of every archived group's description (:func:`archive_group`): the archive is keyed by the weights, design and
settings, not by the source code (an edit of a comment must not throw away hours of predictions), so a change of
what a group computes must raise this number (or ``GROUP_KEYS``), and its archived predictions are then recomputed."""


def _group_description(ctx: Context, name: str) -> dict:
    """What a group's predictions depend on: the weights, masks, queries, every setting and
    :data:`ARCHIVE_VERSION` (not the source code)."""
    from ..io import weights_sha256

    return json.loads(json.dumps({
        "group": name, "version": ARCHIVE_VERSION, "weights": weights_sha256(ctx.model)[:16], "masks": ctx.masks_key, "queries": ctx.queries,
        "whole_network": {k: getattr(ctx.wconfig, k) for k in ("n_fit", "seed", "mc_samples", "alpha")},
        "methods": {k: v for k, v in asdict(ctx.config).items() if k not in ("groups", "n_queries")},
        "n_queries": ctx.config.n_queries, **GROUP_KEYS.get(name, {})}, default=float))


def archived_group(archive_dir, description: dict) -> dict | None:
    """A method group's predictions kept in the repository by :func:`archive_group`, or None when absent or written
    for another description (another model, design or setting)."""
    if archive_dir is None:
        return None
    path = Path(archive_dir) / f"{description['group']}.json"
    if not path.is_file() or not path.with_suffix(".npz").is_file():
        return None
    from ..io import file_sha256

    stored = json.loads(path.read_text())
    if stored["description"] != description:
        log(f"{path} was written for another model or setting: group {description['group']} is computed again")
        return None
    if stored.get("npz_sha256") != file_sha256(path.with_suffix(".npz")):
        log(f"{path.with_suffix('.npz')} is not the file {path.name} describes: group {description['group']} is "
            f"computed again")
        return None
    with np.load(path.with_suffix(".npz")) as arrays:
        return {k: {**v, "pred": torch.as_tensor(arrays[k])} for k, v in stored["entries"].items()}


def archive_group(archive_dir, description: dict, stored: dict) -> None:
    """Keep a method group's predictions in the repository: ``<group>.npz`` (the (D, M, W) float64 predictions, by
    method key) and ``<group>.json`` (the description and each key's dampings and meta), written atomically, the
    JSON last. The predictions need only the full-data model, so they are computed once, in any session, whether
    or not the subset models exist; the LDS then only reads them back. A few hundred kB per group."""
    from ..io import atomic_write, file_sha256

    base = Path(archive_dir) / description["group"]
    arrays = {k: v["pred"].double().numpy() for k, v in stored.items()}
    def write_arrays(tmp):
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)

    atomic_write(base.with_suffix(".npz"), write_arrays)
    entries = {k: {"dampings": v["dampings"], "meta": v["meta"]} for k, v in stored.items()}
    digest = file_sha256(base.with_suffix(".npz"))  # ties the pair: a crash between the two writes is detected
    atomic_write(base.with_suffix(".json"), lambda tmp: tmp.write_text(
        json.dumps({"description": description, "npz_sha256": digest, "entries": entries}, indent=1)))


def method_predictions(ctx: Context, on_group=None) -> dict:
    """Run (or read back) every group of ``ctx.config.groups``, in :data:`GROUPS` order.

    A group is read back from ``ctx.archive_dir`` (the predictions kept in the repository, :func:`archive_group`)
    when it is there for the same model, design and settings, else from the cache, else computed; a group computed
    or read from the cache is then archived.

    Args:
        ctx: the :class:`Context`. on_group: optional callback(name, results so far) after each group (the
            entry point rewrites its results file there, so a stopped run keeps what it finished).
    Returns:
        {key: {"dampings", "pred" (D, M, W) float64, "meta", "group", "default_damping"}}; W = 1 + Q, or
        1 + n_solver_queries for CG and LiSSA. A group that returns a key an earlier group gave (``fishers_low``)
        extends that entry: its dampings and predictions are appended, and ``meta["extended_by"]`` names it.
    """
    results = {}
    for name in [g for g in GROUPS if g in ctx.config.groups]:
        fn = GROUP_FUNCTIONS[name]
        cache = ctx.cache(f"group {name}", ["ifutils.datamodels", fn, Context, _weighted],
                          {"methods": {k: v for k, v in asdict(ctx.config).items() if k != "groups"},
                           **GROUP_KEYS.get(name, {})})
        description = _group_description(ctx, name) if ctx.archive_dir is not None else None
        stored = archived_group(ctx.archive_dir, description) if description is not None else None
        archived = stored is not None
        if stored is None:
            stored = cache.get("result") if cache is not None else None
        if stored is None:
            log(f"LDS predictions: {name}")
            with ctx.stages(f"method group: {name}"):
                got = fn(ctx)
            stored = {k: {"dampings": json.dumps(v["dampings"]), "pred": torch.as_tensor(v["pred"]),
                          "meta": json.dumps(v["meta"], default=float)} for k, v in got.items()}
            if cache is not None:
                cache.put("result", stored)
        if description is not None and not archived:
            archive_group(ctx.archive_dir, description, stored)
        for k, v in stored.items():
            meta, dampings = json.loads(v["meta"]), json.loads(v["dampings"])
            if k in results:  # an extension of an earlier group's entry (its default damping stays)
                prev = results[k]
                results[k] = {**prev, "dampings": prev["dampings"] + dampings,
                              "pred": np.concatenate([prev["pred"], v["pred"].double().numpy()]),
                              "meta": {**prev["meta"], **meta,
                                       "extended_by": [*prev["meta"].get("extended_by", []), name]}}
                continue
            default = None if dampings == [None] else meta.get("default_damping", ctx.default_damping)
            results[k] = {"dampings": dampings, "pred": v["pred"].double().numpy(), "meta": meta, "group": name,
                          "default_damping": default}
        if on_group is not None:
            on_group(name, results)
    return results
