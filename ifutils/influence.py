"""Influence scores of training samples on test losses (Koh & Liang 2017, eq. 2)."""

from __future__ import annotations

import torch

from ._checks import check_damping, check_finite_rows, check_tensor
from .curvature import Curvature


def influence(train_grads: torch.Tensor, test_grads: torch.Tensor, curvature: Curvature, damping) -> torch.Tensor:
    """Influence of each training sample on each test loss.

    I[i, j] = -g_test[j]^T (C + damping I)^{-1} g_train[i]   (Koh & Liang 2017, eq. 2)

    Sign convention: with the training objective L = (1/n) sum_i l_i, I[i, j] is the derivative of
    test loss j with respect to up-weighting sample i by epsilon (L + epsilon l_i). A positive
    I[i, j] means sample i is harmful to test sample j: removing it (epsilon = -1/n) changes test
    loss j by about -I[i, j] / n, i.e. lowers it. A negative score means sample i helps.

    Args:
        train_grads: (n_train, p) per-sample gradients of the mean token NLL (nats/token).
        test_grads: (n_test, p) gradients of the test losses, same convention.
        curvature: a :class:`~ifutils.curvature.Curvature` over the same p coordinates.
        damping: float >= 0 added to the diagonal, or a (p,) tensor of per-coordinate dampings.
    Returns:
        (n_train, n_test) float64 tensor on the gradients' device.
    Raises:
        TypeError: a gradient is not a torch tensor (e.g. a NumPy array: use ``torch.from_numpy``), or ``damping``
            is not a number or tensor (e.g. the string ``"1e-3"`` or None).
        ValueError: gradients not 2-D, mismatched p, ``damping < 0``, or a singular damped curvature.
        FloatingPointError: NaN or Inf in the gradients (the message names the rows).
    """
    _check_grads(train_grads, test_grads)
    damping = check_damping(damping)
    # Solve for the few test gradients, then one product with all training gradients.
    return -(train_grads.double() @ curvature.solve(test_grads.double().T, damping).to(train_grads.device))


def _check_grads(train_grads: torch.Tensor, test_grads: torch.Tensor | None = None) -> None:
    """(n, p) gradients, finite, with the same p: else ValueError / FloatingPointError naming the problem."""
    pairs = [("train_grads", train_grads)] + ([("test_grads", test_grads)] if test_grads is not None else [])
    for name, g in pairs:
        check_tensor(g, name)
        if g.dim() != 2:
            raise ValueError(f"{name} must be (n, p), got shape {tuple(g.shape)}; use g[None] for one sample")
        check_finite_rows(g, name)
    if test_grads is not None and train_grads.shape[1] != test_grads.shape[1]:
        raise ValueError(f"train gradients have p={train_grads.shape[1]}, test gradients p={test_grads.shape[1]}")


def self_influence(train_grads: torch.Tensor, curvature: Curvature, damping) -> torch.Tensor:
    """g_i^T (C + damping I)^{-1} g_i per training sample (Koh & Liang 2017, sec. 5.4: large values flag
    mislabelled or atypical samples). Returns (n_train,) float64; raises like :func:`influence`."""
    _check_grads(train_grads)
    damping = check_damping(damping)
    g = train_grads.double()
    return (g * curvature.solve(g.T, damping).T.to(g.device)).sum(1)


def gradient_similarity(train_grads: torch.Tensor, test_grads: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Hessian-free pairwise scores, in the sign convention of :func:`influence` (positive = harmful).

    ``"dot"``: -g_test^T g_train, TracIn at the last checkpoint up to the learning rate (Pruthi et al. 2020,
    eq. 3), i.e. influence with C = I and no damping. ``"cosine"``: -cos(g_test, g_train), the gradient-cosine
    similarity (Charpiat et al. 2019; "GC" in Hanawa et al. 2021), a Hessian-free baseline of the kind Chhabra
    et al. 2024 (Outlier Gradient Analysis, arXiv 2405.03869) compare against.

    Args:
        train_grads: (n_train, p); test_grads: (n_test, p) per-sample gradients (nats/token).
    Returns:
        (n_train, n_test) float64.
    Raises:
        ValueError: unknown ``kind``, or a zero gradient for the cosine.
    """
    if kind not in ("dot", "cosine"):
        raise ValueError(f"kind must be 'dot' or 'cosine', got {kind!r}")
    _check_grads(train_grads, test_grads)
    a, b = train_grads.double(), test_grads.double()
    if kind == "cosine":
        norms = [(name, g.norm(dim=1)) for name, g in (("train", a), ("test", b))]
        for name, n in norms:
            if (n == 0).any():
                raise ValueError(f"a {name} gradient is zero (rows {(n == 0).nonzero().flatten()[:10].tolist()}); "
                                 f"the cosine is undefined, use kind='dot'")
        a, b = a / norms[0][1][:, None], b / norms[1][1][:, None]
    return -(a @ b.T)


def outlier_scores(train_grads: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Outlier Gradient Analysis (Chhabra et al. 2024, arXiv 2405.03869, sec. 4 and Alg. 1): detrimental
    samples are outliers in gradient space, found without any Hessian. Higher score = more outlying
    (predicted more detrimental).

    Returns:
        dict of (n_train,) float64 tensors: ``"gradient L1 norm"``, ``"gradient L2 norm"`` and
        ``"isolation forest"`` (minus scikit-learn's ``IsolationForest.score_samples``, Liu, Ting, Zhou 2008,
        default settings, ``random_state=seed``).
    """
    from sklearn.ensemble import IsolationForest

    _check_grads(train_grads)
    g = train_grads.double()
    forest = IsolationForest(random_state=seed).fit(g.cpu().numpy())
    return {
        "gradient L1 norm": g.abs().sum(1),
        "gradient L2 norm": g.norm(dim=1),
        "isolation forest": -torch.as_tensor(forest.score_samples(g.cpu().numpy()), dtype=torch.float64),
    }


def newton_removal(theta: torch.Tensor, removed_grads_sum: torch.Tensor, n: int, curvature: Curvature,
                   damping) -> torch.Tensor:
    """Parameters after removing a set S of training samples by one influence (Newton) step.

        theta_{-S} = theta + (1/n) (C + damping I)^{-1} sum_{i in S} g_i

    With L(theta) = (1/n) sum_i l_i, the objective without S is L_{-S} = L - (1/n) sum_{i in S} l_i; at a minimum
    theta of L its gradient is -(1/n) sum_{i in S} g_i, so this is a Newton step on L_{-S} when C is its Hessian
    (exact for a quadratic objective), and the group influence-function approximation of Koh, Ang, Teo, Liang
    2019 ("On the accuracy of influence functions for measuring group effects") when C is the full-data curvature;
    the unlearning step of Guo et al. 2020 ("Certified data removal", eq. 3) and Warnecke et al. 2023.

    Args:
        theta: (p,) trained parameters. removed_grads_sum: (p,) sum of the removed samples' gradients (the same
            loss convention as L's terms). n: training-set size the objective divides by (with S in it).
        curvature: a :class:`~ifutils.curvature.Curvature` over the p coordinates. damping: as :func:`influence`.
    Returns:
        (p,) float64 tensor.
    Raises:
        ValueError: shapes differ or n < 1; see :meth:`Curvature.solve` for the damping.
    """
    if theta.dim() != 1 or removed_grads_sum.shape != theta.shape:
        raise ValueError(f"theta {tuple(theta.shape)} and removed_grads_sum {tuple(removed_grads_sum.shape)} must be "
                         f"the same (p,) shape")
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n must be an int >= 1 (the training-set size), got {n!r}")
    return theta.double() + curvature.solve(removed_grads_sum.double(), damping).reshape(-1) / n
