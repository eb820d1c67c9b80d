"""An exact whole-network influence reference without forming a matrix (issue 14, item 3).

The curvature C is one of the P x P matrices of the whole network's training objective
L(theta) = (1/n) sum_i l_i(theta), l_i the mean token NLL of sentence i in nats, theta every parameter tensor of the
:class:`~ifutils.model.LSTMLM` (or the named ones), flattened and concatenated in ``names`` order
(``model.named_parameters()`` order by default):

* ``"H"``, the Hessian, indefinite away from a minimum;
* ``"F"``, the Gauss-Newton matrix = the true Fisher in closed form, positive semi-definite;
* ``"EF"``, the sentence-level empirical Fisher (for completeness; it needs the (n, P) per-sentence gradients).

Their products C v come from :class:`~ifutils.curvature.estimators.CurvatureProducts` (forward-over-reverse for
H, jvp / softmax Hessian / vjp for F; ``torch.func`` through PyTorch's native LSTM kernel on CPU, the unrolled LSTM
elsewhere). This module turns them into

* :class:`NetworkOperator`: a matvec of the solvers' convention, (P,) or (P, m) in, float64 of the same shape out
  (columns vmapped in blocks, or looped), counting its column products;
* :class:`NetworkOperatorCurvature`: a :class:`~ifutils.curvature.Curvature` whose ``solve`` is CG, LiSSA or Arnoldi
  (:mod:`ifutils.curvature.inverse`) on that operator, so :func:`ifutils.influence.influence` gives
  -g_train^T (C + lambda I)^{-1} g_test unchanged; every solve is recorded with its true relative residual
  ||(C + lambda I) x - b|| / ||b|| (one more product per column) beside the solver's own diagnostics;
* :func:`extreme_eigenvalues`: lambda_min and lambda_max of C by Lanczos (ARPACK) and the dampings that make
  C + lambda I positive definite (lambda > -lambda_min).

Cost: one column product costs about two (H: forward-over-reverse) or three (F: jvp + vjp) gradient passes over the
n sentences; a CG solve of m columns costs m x (iterations + 1) of them.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings

import torch
from torch.func import vmap

from .base import Curvature, Damping, _describe
from .estimators import (
    CURVATURES,
    CurvatureProducts,
    hutchinson,
    lanczos_extreme,
    rademacher,
)
from .inverse import (
    HUTCHINSON_PROBES,
    SolverWarning,
    arnoldi,
    arnoldi_solve,
    conjugate_gradient,
    lissa,
)

METHODS = ("cg", "lissa", "arnoldi")


class NetworkOperator:
    """v -> C v for the whole-network curvature ``curvature`` of ``products``, in the solvers' convention.

    Args:
        products: the :class:`CurvatureProducts` of the model, sentences and parameter names.
        curvature: ``"H"`` (Hessian), ``"F"`` (GGN = true Fisher) or ``"EF"`` (empirical Fisher).
        block: columns per call of the underlying product (memory grows with it), >= 1.
        vectorize: vmap the product over the columns of a block (``torch.func.vmap``; one pass per block);
            False: one product per column in a Python loop (same values, less memory, slower).
    Call:
        v: (P,) or (P, m) tensor of any floating dtype and device; cast to the model's dtype and moved to its device.
        Returns C v of v's shape, float64, on the model's device.
    Attributes:
        p: P. dtype, device: the model's. curvature: the key above. matvecs: column products made so far.
    Raises:
        ValueError: an unknown curvature, block < 1; at call time, v not (P,) or (P, m) or not a float tensor.
    """

    def __init__(self, products: CurvatureProducts, curvature: str, block: int = 8, vectorize: bool = True):
        if not isinstance(products, CurvatureProducts):
            raise TypeError(f"products must be a CurvatureProducts, got {type(products).__name__}; build one with "
                            f"CurvatureProducts(model, sentences, eos_id)")
        if curvature not in CURVATURES:
            raise ValueError(f"unknown curvature {curvature!r}; choose from {', '.join(CURVATURES)}")
        if not (isinstance(block, int) and block >= 1):
            raise ValueError(f"block must be an int >= 1 (columns per product call), got {block!r}")
        self.products, self.curvature, self.block, self.vectorize = products, curvature, block, vectorize
        self.p, self.device = products.p, products.device
        self.dtype = next(iter(products.params.values())).dtype
        self._product = products.matvec(curvature)
        self.matvecs = 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(v) or not v.is_floating_point() or v.dim() not in (1, 2) or v.shape[0] != self.p:
            shown = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
            raise ValueError(f"the {self.curvature} operator needs a floating ({self.p},) or ({self.p}, m) tensor, "
                             f"got {shown}")
        cols = (v[:, None] if v.dim() == 1 else v).to(dtype=self.dtype, device=self.device)
        out = []
        for start in range(0, cols.shape[1], self.block):
            chunk = cols[:, start : start + self.block]
            if self.vectorize and chunk.shape[1] > 1:
                out.append(vmap(self._product, in_dims=1, out_dims=1)(chunk).double())
            else:
                out.append(torch.stack([self._product(c) for c in chunk.T], 1).double())
        self.matvecs += cols.shape[1]
        return torch.cat(out, 1).reshape(v.shape)


def network_operator(model, sentences: list[torch.Tensor], eos_id: int, curvature: str,
                     names: list[str] | None = None, batch_size: int = 32, block: int = 8,
                     vectorize: bool = True) -> NetworkOperator:
    """:class:`NetworkOperator` of ``curvature`` over :class:`CurvatureProducts` ``(model, sentences, eos_id, names,
    batch_size)``; see both for the arguments and the errors raised."""
    return NetworkOperator(CurvatureProducts(model, sentences, eos_id, names, batch_size), curvature, block,
                           vectorize)


_DEFAULT_NAMES = {("H", "cg"): "hessian_cg", ("H", "lissa"): "hessian_lissa", ("F", "cg"): "ggn",
                  ("F", "lissa"): "ggn", ("F", "arnoldi"): "ggn", ("EF", "cg"): "ef", ("EF", "lissa"): "ef",
                  ("EF", "arnoldi"): "ef"}


class NetworkOperatorCurvature(Curvature):
    """The whole-network curvature of a :class:`NetworkOperator`, solved without a matrix by CG, LiSSA or Arnoldi.

    ``solve(b, damping)`` returns x ~ (C + damping I)^{-1} b, float64 of b's shape ((P,) or (P, m)), on the model's
    device; a (P,) damping tensor is a diagonal (CG and LiSSA only). Solvers: :func:`conjugate_gradient`
    (Hestenes & Stiefel 1952), :func:`lissa` (Agarwal et al. 2017), :func:`arnoldi` + :func:`arnoldi_solve`
    (Schioppa et al. 2022; its Ritz pairs are computed once, at the first solve, and reused).

    Each solve appends to :attr:`records` (and sets :attr:`last_info` to) a dict with ``name``, ``curvature``,
    ``method``, ``damping`` (float, or the range of a diagonal), ``columns`` (m), ``iterations`` (CG iterations,
    LiSSA steps, or Arnoldi's Krylov dimension), ``matvecs`` (column products of the solve, Arnoldi's fit included
    at the first solve), ``relative_residual`` (per column, ||(C + D) x - b|| / ||b|| recomputed with one product
    per column when ``check_residual``, else None), ``max_relative_residual``, ``seconds`` (wall time, check
    excluded) and ``solver_info`` (the solver's own info dict: CG's recursively updated residual, LiSSA's last
    update, Arnoldi's Ritz residuals and the fraction of b outside the Ritz vectors).

    Args:
        operator: the :class:`NetworkOperator`.
        method: ``"cg"``, ``"lissa"`` (needs ``scale`` and ``depth``; ``scale`` may be a callable of the damping, it
            must exceed half the largest eigenvalue of C + damping I) or ``"arnoldi"`` (needs ``rank``; takes
            ``num_iter``, ``seed``, ``tol``, ``complement``).
        name: key (:mod:`ifutils.curvature.labels`); default ``"hessian_cg"``, ``"hessian_lissa"``,
            ``"arnoldi_r<rank>[_complement]"`` for H, ``"ggn"`` for F, ``"ef"`` for EF.
        trace: tr(C) if known, else estimated for :meth:`mean_eigenvalue` by Hutchinson with ``probes`` Rademacher
            probes seeded by ``probe_seed``.
        check_residual: recompute the true residual after each solve (one product per column).
        **solver_options: keyword arguments of the solver (tol, max_iter, scale, depth, ...).
    Raises:
        TypeError: operator not a :class:`NetworkOperator`, or options the solver does not take / required ones
            missing. ValueError: an unknown method.
    """

    def __init__(self, operator: NetworkOperator, method: str = "cg", name: str | None = None,
                 trace: float | None = None, probes: int = HUTCHINSON_PROBES, probe_seed: int = 0,
                 check_residual: bool = True, **solver_options):
        if not isinstance(operator, NetworkOperator):
            raise TypeError(f"operator must be a NetworkOperator, got {type(operator).__name__}; build one with "
                            f"network_operator(model, sentences, eos_id, 'H')")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        self.operator, self.p, self.method, self.check_residual = operator, operator.p, method, check_residual
        self.psd = operator.curvature in ("F", "EF")
        if method == "arnoldi":
            allowed = {"rank", "num_iter", "seed", "tol", "complement"}
            if "rank" not in solver_options or set(solver_options) - allowed:
                raise TypeError(f"method 'arnoldi' needs rank= and takes only {sorted(allowed)}, got "
                                f"{sorted(solver_options)}")
            self._arnoldi = {"num_iter": None, "seed": 0, "tol": 1e-6, **solver_options}
            self._complement = self._arnoldi.pop("complement", True)
            self._ritz: tuple | None = None
            rank = solver_options["rank"]
            default = f"arnoldi_r{rank}" + ("_complement" if self._complement else "")
            if operator.curvature != "H":
                default = _DEFAULT_NAMES[(operator.curvature, method)]
        else:
            solver = conjugate_gradient if method == "cg" else lissa
            try:
                inspect.signature(solver).bind(operator, None, 0.0, **solver_options)
            except TypeError as err:
                raise TypeError(f"options {sorted(solver_options)} do not fit method {method!r}: {err}") from err
            self._solver, self._options = solver, solver_options
            default = _DEFAULT_NAMES[(operator.curvature, method)]
        self.name = name or default
        self._trace, self._probes, self._probe_seed = trace, probes, probe_seed
        self.records: list[dict] = []
        self.last_info: dict = {}

    @property
    def nbytes(self) -> int:
        """Bytes of the Ritz vectors held (Arnoldi, after the first solve), else 0: no matrix is held."""
        if self.method == "arnoldi" and self._ritz is not None:
            return sum(t.numel() * t.element_size() for t in self._ritz[:2])
        return 0

    def eigvalsh(self) -> torch.Tensor:
        raise NotImplementedError(
            f"{self.name} is a matrix-free whole-network operator (P = {self.p:,}); use extreme_eigenvalues(operator, "
            f"...) for lambda_min and lambda_max, or ArnoldiCurvature for its top eigenvalues")

    def mean_eigenvalue(self) -> float:
        """tr(C) / P: from ``trace`` if given, else a Hutchinson estimate (computed once, then cached)."""
        if self._trace is None:
            probes = rademacher(self._probes, self.p, self._probe_seed, device=self.operator.device)
            self._trace = hutchinson(self.operator, probes, block=self.operator.block)["trace"]
        return self._trace / self.p

    def solve(self, v: torch.Tensor, damping: Damping) -> torch.Tensor:
        """(C + diag(damping))^{-1} v by the chosen solver; appends a record to :attr:`records` (class docstring).

        Raises:
            TypeError, ValueError: see :meth:`Curvature.solve`; ValueError also for a tensor damping with Arnoldi.
        Warns:
            SolverWarning: the solver missed its tolerance (CG, LiSSA, Arnoldi's Ritz residuals).
        """
        v, damping = self._check(v, damping, self.operator.device)
        start_matvecs, start = self.operator.matvecs, time.perf_counter()
        if self.method == "arnoldi":
            if self._ritz is None:
                self._ritz = arnoldi(self.operator, self.p, **self._arnoldi)
            evals, evecs, ritz_info = self._ritz
            x, info = arnoldi_solve(evals, evecs, v, damping, self._complement)
            info = {**info, "arnoldi": ritz_info}
            iterations = ritz_info["iterations"]
        else:
            options = {k: opt(damping) if callable(opt) else opt for k, opt in self._options.items()}
            x, info = self._solver(self.operator, v, damping, **options)
            iterations = info["iterations"] if self.method == "cg" else info["depth"]
        seconds = time.perf_counter() - start
        matvecs = self.operator.matvecs - start_matvecs
        residual = relative_residual(self.operator, x, v, damping) if self.check_residual else None
        record = {"name": self.name, "curvature": self.operator.curvature, "method": self.method,
                  "damping": float(damping) if not torch.is_tensor(damping) else _describe(damping),
                  "columns": 1 if v.dim() == 1 else v.shape[1], "iterations": int(iterations), "matvecs": matvecs,
                  "relative_residual": residual,
                  "max_relative_residual": max(residual) if residual is not None else None,
                  "seconds": seconds, "solver_info": info}
        self.records.append(record)
        self.last_info = record
        return x


def relative_residual(mv, x: torch.Tensor, b: torch.Tensor, damping: Damping) -> list[float]:
    """Per column ||(C + D) x - b|| / ||b|| (0 for a zero column b), D = damping I or diag(damping).

    Args:
        mv: C as a matvec, (P, m) -> (P, m). x, b: (P,) or (P, m), same shape. damping: float or (P,) tensor.
    Returns:
        list of m floats (one for a (P,) b).
    """
    xs, bs = (x[:, None], b[:, None]) if x.dim() == 1 else (x, b)
    xs, bs = xs.double(), bs.double().to(xs.device)
    diag = damping.double().to(xs.device)[:, None] if torch.is_tensor(damping) and damping.dim() > 0 else float(damping)
    r = (mv(xs).double() + diag * xs - bs).norm(dim=0)
    bnorm = bs.norm(dim=0)
    return torch.where(bnorm > 0, r / bnorm.clamp_min(torch.finfo(torch.float64).tiny), r).tolist()


def _lanczos(matvec, p: int, which: str, dtype, device, tol: float, max_matvecs: int, seed: int) -> dict:
    """One extreme eigenvalue (:func:`ifutils.curvature.estimators.lanczos_extreme`)."""
    return lanczos_extreme(matvec, p, which, dtype, device, tol, max_matvecs, seed)


def extreme_eigenvalues(matvec, p: int, dtype=torch.float64, device="cpu", tol: float = 1e-6,
                        max_matvecs: int = 300, seed: int = 0, dampings=()) -> dict:
    """lambda_max and lambda_min of a symmetric P x P C (e.g. the indefinite whole-network Hessian) by Lanczos,
    and the dampings lambda that make C + lambda I positive definite.

    Two runs of ARPACK's implicitly restarted Lanczos (``scipy.sparse.linalg.eigsh``, which="LA" and which="SA",
    ncv = min(P, 20) Lanczos vectors, relative accuracy ``tol``), each from the same seeded normal start vector.
    C + lambda I is positive definite iff lambda > -lambda_min (its eigenvalues are lambda_k + lambda). A Ritz
    value lies inside the spectrum, so the reported lambda_min is an upper bound of the true one (and lambda_max a
    lower bound): ``pd_threshold`` = -lambda_min is exact to within ``tol`` |lambda_min| when converged and a lower
    bound otherwise. A damping is called positive definite when lambda + lambda_min > tol |lambda_min| (the
    margin of ARPACK's accuracy).

    Args:
        matvec: (P,) -> (P,) product with C (a :class:`NetworkOperator`, or any function), called with ``dtype``
            tensors on ``device``.
        p: P, >= 2.
        tol: ARPACK's relative accuracy of each Ritz value, > 0.
        max_matvecs: budget of products per run (ARPACK stops after about this many restarts x (ncv - 1)).
        seed: seed of the start vector.
        dampings: dampings lambda >= 0 to assess.
    Returns:
        dict with ``lambda_max``, ``lambda_min`` (floats in the units of C; NaN when no Ritz value converged),
        ``lambda_max_converged``, ``lambda_min_converged`` (when False the value is the best converged Ritz value,
        a bound), ``matvecs`` ({"LA": products, "SA": products}), ``tol``, ``seed``, ``indefinite``
        (lambda_min < 0 beyond the margin), ``pd_threshold`` (-lambda_min: C + lambda I is positive definite for
        lambda above it; <= 0 when C itself is), ``min_pd_damping`` (max(0, pd_threshold), the smallest admissible
        damping), and ``dampings``: {str(lambda): {"damping", "positive_definite", "lambda_min_damped"
        (lambda_min + lambda), "condition_number" ((lambda_max + lambda) / (lambda_min + lambda), inf when not
        positive definite), "lissa_min_scale" ((lambda_max + lambda) / 2, below which LiSSA diverges)}}.
    Raises:
        ValueError: p < 2, tol <= 0, max_matvecs < 1, or a negative damping.
    """
    if not (isinstance(p, int) and p >= 2):
        raise ValueError(f"p must be an int >= 2 (eigsh needs k < P), got {p!r}")
    if not tol > 0 or not max_matvecs >= 1:
        raise ValueError(f"need tol > 0 and max_matvecs >= 1, got tol={tol}, max_matvecs={max_matvecs}")
    dampings = [float(d) for d in dampings]
    if any(not d >= 0 for d in dampings):
        raise ValueError(f"dampings must be >= 0, got {dampings}")
    top = _lanczos(matvec, p, "LA", dtype, device, tol, max_matvecs, seed)
    bottom = _lanczos(matvec, p, "SA", dtype, device, tol, max_matvecs, seed)
    lmax, lmin = top["value"], bottom["value"]
    margin = tol * abs(lmin)
    for run, which in ((top, "LA"), (bottom, "SA")):
        if not run["converged"]:
            warnings.warn(f"Lanczos ({which}) did not converge to tol={tol:g} within {run['matvecs']} products; the "
                          f"value is a bound only: raise max_matvecs or loosen tol", SolverWarning, stacklevel=2)

    def assess(d):
        shifted = lmin + d
        pd = bool(shifted > margin)
        return {"damping": d, "positive_definite": pd, "lambda_min_damped": shifted,
                "condition_number": (lmax + d) / shifted if pd else math.inf, "lissa_min_scale": (lmax + d) / 2}

    return {"lambda_max": lmax, "lambda_min": lmin, "lambda_max_converged": top["converged"],
            "lambda_min_converged": bottom["converged"], "matvecs": {"LA": top["matvecs"], "SA": bottom["matvecs"]},
            "tol": tol, "seed": seed, "indefinite": bool(lmin < -margin), "pd_threshold": -lmin,
            "min_pd_damping": max(0.0, -lmin), "dampings": {repr(d): assess(d) for d in dampings}}
