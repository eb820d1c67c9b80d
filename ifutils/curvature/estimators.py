"""Matrix-free trace and eigenvalue estimators, and whole-network curvature-vector products (Karakida, Akaho,
Amari 2019 statistics).

The objective is L(theta) = (1/n) sum_i l_i(theta), l_i the mean token NLL of sentence i in nats (the scale of
:func:`ifutils.curvature.hessian_and_ggn`), theta all P parameters or the named tensors. With T_i tokens in
sentence i, logits z_t, p_t = softmax(z_t), Lambda_t = diag(p_t) - p_t p_t^T and g_i = d l_i / d theta:

* ``"F"``, the true Fisher in closed form = the Gauss-Newton matrix (Martens 2020, sec. 9.2):
  F = (1/n) sum_i (1/T_i) sum_t J_t^T Lambda_t J_t,  J_t = d z_t / d theta;
  F v = jvp of the logits, times Lambda_t, then vjp of the logits.
* ``"H"``, the Hessian of L; H v by forward-over-reverse, jvp(grad L).
* ``"EF"``, the sentence-level empirical Fisher E = (1/n) sum_i g_i g_i^T; E v = G^T (G v) / n with the
  per-sentence gradients G (n, P) held in memory: Kunstner, Balles, Hennig (2019, eq. 3) with the sentence as
  the example. (``ifutils.curvature.empirical_fisher`` weights each outer product by T_i instead.)

Statistics of a symmetric P x P matrix C with eigenvalues lambda_1..lambda_P (Karakida et al. 2019,
Theorem 1, which predicts, for width M of a random network, m = O(1/M), s = O(1), lambda_max = O(M)):
m = tr(C) / P, s = tr(C^2) / P, lambda_max. m and s are Hutchinson estimates: with Rademacher probes v,
E[v^T C v] = tr(C) and E[||C v||^2] = tr(C^2), so one product per probe gives both; lambda_max is the
largest algebraic eigenvalue by Lanczos (ARPACK through ``scipy.sparse.linalg.eigsh``).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
from torch.func import functional_call, grad, jvp, vjp

from ..data import bucket_batches, make_batch
from ..model import LSTMLM, sentence_loss
from ..progress import progress

CURVATURES = ("F", "H", "EF")
Matvec = Callable[[torch.Tensor], torch.Tensor]


def _transforms(method):
    """Run a product without autograd graphs for the frozen parameters (``torch.func`` transforms ignore the
    outer no_grad) and without oneDNN, whose fused CPU LSTM has no forward-mode AD (PyTorch's native one has)."""

    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", message="TF32 acceleration")  # printed whenever the flags are set
            with torch.backends.mkldnn.flags(enabled=False):
                return method(*args, **kwargs)

    return wrapped


class CurvatureProducts:
    """Matrix-free products with the true Fisher, the Hessian and the empirical Fisher of L (module docstring).

    The model runs in eval mode through its fused ``nn.LSTM`` on CPU (``torch.func`` differentiates PyTorch's
    native kernel; oneDNN is switched off) and through the unrolled LSTM elsewhere (cuDNN's has no forward-mode
    AD); parameters not in ``names`` stay fixed. Vectors are flat (P,): the chosen parameters concatenated in
    ``names`` order, each flattened, in the model's dtype and device.

    Args:
        model: an :class:`LSTMLM` in eval mode.
        sentences: the n sentences, 1-D int64 tensors ending in ``<eos>``.
        eos_id: start and padding id.
        names: parameter names, default all of ``model.named_parameters()``.
        batch_size: sentences per batch (length-bucketed).
    Attributes:
        p: P, the number of parameters.
    Raises:
        ValueError: no sentences or an empty one, no names or an unknown one, or the model in training mode.
    """

    def __init__(self, model: LSTMLM, sentences: list[torch.Tensor], eos_id: int, names: list[str] | None = None,
                 batch_size: int = 32):
        if not sentences:
            raise ValueError("no sentences given; the curvature of an empty objective is undefined")
        if model.training:
            raise ValueError("the model is in training mode; call model.eval() so that dropout is off")
        all_params = dict(model.named_parameters())
        names = list(all_params) if names is None else list(names)
        unknown = [k for k in names if k not in all_params]
        if not names or unknown:
            raise ValueError(f"unknown or no parameter names {unknown}; valid names: {', '.join(all_params)}")
        self.model, self.sentences, self.eos_id, self.names = model, sentences, eos_id, names
        self.params = {k: all_params[k].detach() for k in names}
        self.p = sum(x.numel() for x in self.params.values())
        self.device = all_params[names[0]].device
        self.batches = [tuple(t.to(self.device) for t in make_batch([sentences[i] for i in idx], eos_id))
                        for idx in bucket_batches([len(s) for s in sentences], batch_size)]
        self._grads: torch.Tensor | None = None

    def matvec(self, curvature: str) -> Matvec:
        """The product v -> C v for ``curvature`` in ``("F", "H", "EF")``.

        Raises:
            ValueError: an unknown curvature name.
        """
        products = {"F": self.fisher_vp, "H": self.hessian_vp, "EF": self.ef_vp}
        if curvature not in products:
            raise ValueError(f"unknown curvature {curvature!r}; choose from {', '.join(products)}")
        return products[curvature]

    def _unflat(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        sizes = [x.numel() for x in self.params.values()]
        return {k: x.view(self.params[k].shape) for k, x in zip(self.names, v.split(sizes))}

    def _flat(self, d: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([d[k].reshape(-1) for k in self.names])

    def _logits(self, params, inputs):
        return functional_call(self.model, params, (inputs,), {"unrolled": self.device.type != "cpu"})

    def _loss(self, params, batch, n):  # batch's share of (1/n) sum_i l_i
        inputs, targets, mask = batch
        return sentence_loss(self._logits(params, inputs), targets, mask).sum() / n

    @_transforms
    def hessian_vp(self, v: torch.Tensor) -> torch.Tensor:
        """H v, (P,) -> (P,), forward-over-reverse: jvp of grad L in direction v."""
        n, tangent = len(self.sentences), (self._unflat(v),)
        return sum(self._flat(jvp(lambda p, b=b: grad(self._loss)(p, b, n), (self.params,), tangent)[1])
                   for b in self.batches)

    @_transforms
    def fisher_vp(self, v: torch.Tensor) -> torch.Tensor:
        """F v = (1/n) sum_i (1/T_i) sum_t J_t^T Lambda_t J_t v, (P,) -> (P,): jvp, softmax Hessian, vjp."""
        out, n = 0, len(self.sentences)
        for inputs, _, mask in self.batches:
            z, jz = jvp(lambda p, x=inputs: self._logits(p, x), (self.params,), (self._unflat(v),))
            prob = torch.softmax(z, -1)
            lam_jz = prob * jz - prob * (prob * jz).sum(-1, keepdim=True)  # Lambda_t (J_t v) per token
            weight = mask.to(z.dtype) / (mask.sum(-1, keepdim=True) * n)  # 1 / (n T_i) at real tokens, 0 at padding
            pullback = vjp(lambda p, x=inputs: self._logits(p, x), self.params)[1]
            out = out + self._flat(pullback(lam_jz * weight[..., None])[0])
        return out

    @_transforms
    def sentence_grads(self) -> torch.Tensor:
        """(n, P) gradients g_i of each sentence's mean token NLL l_i; computed once, then held
        (n P numbers: 1.4 GB for n = 64 at width 256 in float32)."""
        if self._grads is None:
            self._grads = torch.stack([
                self._flat(grad(self._loss)(self.params, tuple(t.to(self.device) for t in make_batch([s], self.eos_id)), 1))
                for s in progress(self.sentences, desc="per-sentence gradients", unit="sentence", leave=False)])
        return self._grads

    def ef_vp(self, v: torch.Tensor) -> torch.Tensor:
        """E v = G^T (G v) / n, (P,) -> (P,), G the (n, P) per-sentence gradients."""
        g = self.sentence_grads()
        return g.T @ (g @ v) / len(g)


def rademacher(probes: int, p: int, seed: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """(probes, p) independent +-1 entries, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (probes, p), generator=g) * 2 - 1).to(dtype=dtype, device=device)


def hutchinson(matvec: Matvec, probes: torch.Tensor, block: int | None = None) -> dict:
    """Hutchinson (1990, "A stochastic estimator of the trace of the influence matrix for Laplacian smoothing
    splines") estimates of m = tr(C)/P and s = tr(C^2)/P from the given probes: the one trace estimator of
    ``ifutils``.

    With q_k = v_k^T C v_k and r_k = ||C v_k||^2: m = mean(q)/P, s = mean(r)/P, unbiased when
    E[v v^T] = I (Rademacher probes, :func:`rademacher`); exact when (1/K) sum_k v_k v_k^T = I (e.g. Hadamard
    rows) and, for m, when C is diagonal. The variance of tr estimated from K Rademacher probes is
    2 (||C||_F^2 - sum_a C_aa^2) / K.

    Args:
        matvec: product with a symmetric C: (P,) -> (P,) when ``block`` is None, else (P, b) -> (P, b), b <= block
            columns per call (bounds the memory of a vmapped operator such as
            :func:`ifutils.curvature.inverse.hvp_operator`).
        probes: (K, P) probe vectors, K >= 1.
        block: probes per call of ``matvec``, or None for one (P,) vector per call.
    Returns:
        dict with ``trace`` (tr C estimate), ``mean``, ``second_moment`` and their standard errors ``mean_se``,
        ``second_moment_se`` (sample std / sqrt(K) / P; NaN for K = 1), in the units of C and C^2.
    Raises:
        ValueError: no probes, or block < 1.
    """
    if probes.dim() != 2 or len(probes) < 1:
        raise ValueError(f"probes must be a (K, P) tensor with K >= 1, got shape {tuple(probes.shape)}")
    if block is not None and block < 1:
        raise ValueError(f"block must be >= 1 or None, got {block}")
    q, r = [], []
    step = 1 if block is None else block
    for start in range(0, len(probes), step):
        vs = probes[start : start + step]
        cvs = matvec(vs[0]).double()[None] if block is None else matvec(vs.T).double().T
        for v, cv in zip(vs, cvs):
            cv = cv.cpu()
            q.append(float(v.double().cpu() @ cv))
            r.append(float(cv @ cv))
    p, k = probes.shape[1], len(probes)
    se = lambda x: float(np.std(x, ddof=1)) / math.sqrt(k) / p if k > 1 else math.nan  # noqa: E731
    return {"trace": float(np.mean(q)), "mean": float(np.mean(q)) / p, "mean_se": se(q),
            "second_moment": float(np.mean(r)) / p, "second_moment_se": se(r)}


def lanczos_extreme(matvec: Matvec, p: int, which: str = "LA", dtype=torch.float64, device="cpu", tol: float = 1e-3,
                    max_matvecs: int = 60, seed: int = 0) -> dict:
    """One extreme eigenvalue of a symmetric P x P C by implicitly restarted Lanczos (``scipy.sparse.linalg.eigsh``,
    ARPACK; ``which`` = "LA" for the largest algebraic, "SA" for the smallest), ncv = min(P, 20) Lanczos vectors,
    from a seeded standard-normal start vector: the one Lanczos driver of ``ifutils``.

    Args:
        matvec: (P,) -> (P,) product with C, in ``dtype`` on ``device``.
        p: P. tol: ARPACK's relative accuracy of the Ritz value.
        max_matvecs: budget; ARPACK is stopped after about this many products.
    Returns:
        dict with ``value`` (float; when not converged the best converged Ritz value, a bound from inside the
        spectrum, or NaN if none converged), ``converged`` and ``matvecs``.
    Raises:
        ValueError: ``which`` not "LA" or "SA".
    """
    if which not in ("LA", "SA"):
        raise ValueError(f"which must be 'LA' or 'SA', got {which!r}")
    count = [0]
    bar = progress(total=max_matvecs, desc=f"Lanczos ({which})", unit="product")

    def mv(x):
        count[0] += 1
        bar.update(1)
        return matvec(torch.as_tensor(np.ravel(x), dtype=dtype, device=device)).double().cpu().numpy()

    ncv = min(p, 20)
    v0 = np.random.default_rng(seed).standard_normal(p)
    op = LinearOperator((p, p), matvec=mv, dtype=np.float64)
    pick = max if which == "LA" else min
    try:
        value = float(eigsh(op, k=1, which=which, tol=tol, ncv=ncv, v0=v0,
                            maxiter=max(1, max_matvecs // max(1, ncv - 1)))[0][0])
        converged = True
    except ArpackNoConvergence as err:
        value, converged = (float(pick(err.eigenvalues)) if len(err.eigenvalues) else math.nan), False
    finally:
        bar.close()
    return {"value": value, "converged": converged, "matvecs": count[0]}


def lambda_max(matvec: Matvec, p: int, dtype=torch.float64, device="cpu", tol: float = 1e-3,
               max_matvecs: int = 60, seed: int = 0) -> dict:
    """Largest algebraic eigenvalue of a symmetric C (:func:`lanczos_extreme` with which="LA").

    Returns:
        dict with ``lambda_max`` (float), ``lanczos_converged`` (when False, ``lambda_max`` is the best converged
        Ritz value, a lower bound, or NaN if none converged within the budget) and ``lanczos_matvecs``.
    """
    out = lanczos_extreme(matvec, p, "LA", dtype, device, tol, max_matvecs, seed)
    return {"lambda_max": out["value"], "lanczos_converged": out["converged"], "lanczos_matvecs": out["matvecs"]}
