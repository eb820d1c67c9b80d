"""Influence scores of training samples on test losses (Koh & Liang 2017, eq. 2)."""

from __future__ import annotations

import torch

from .curvature import Curvature


def influence(train_grads: torch.Tensor, test_grads: torch.Tensor, curvature: Curvature, damping: float) -> torch.Tensor:
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
        damping: float >= 0 added to the diagonal.
    Returns:
        (n_train, n_test) float64 tensor on the gradients' device.
    Raises:
        ValueError: gradients not 2-D, mismatched p, ``damping < 0``, or a singular damped curvature.
        FloatingPointError: NaN or Inf in the gradients (the message names the rows).
    """
    for name, g in (("train_grads", train_grads), ("test_grads", test_grads)):
        if g.dim() != 2:
            raise ValueError(f"{name} must be (n, p), got shape {tuple(g.shape)}; use g[None] for one sample")
        bad = (~torch.isfinite(g).all(dim=1)).nonzero().flatten().tolist()
        if bad:
            raise FloatingPointError(f"{name} has NaN/Inf in rows {bad[:20]}")
    if train_grads.shape[1] != test_grads.shape[1]:
        raise ValueError(f"train gradients have p={train_grads.shape[1]}, test gradients p={test_grads.shape[1]}")
    # Solve for the few test gradients, then one product with all training gradients.
    return -(train_grads.double() @ curvature.solve(test_grads.double().T, damping))


def relative_damping(curvature: Curvature, alpha: float) -> float:
    """Damping alpha * trace(C) / p, the scale-free choice (kronfluence's default uses alpha = 0.1).

    Raises:
        ValueError: ``alpha < 0``, or the mean eigenvalue is not positive, so no relative scale exists.
    """
    if not alpha >= 0:
        raise ValueError(f"relative damping alpha must be >= 0, got {alpha}")
    scale = curvature.mean_eigenvalue()
    if not scale > 0:
        raise ValueError(f"{curvature.name} has mean eigenvalue {scale:g} <= 0; use absolute damping")
    return alpha * scale
