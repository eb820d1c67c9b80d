"""Curvatures C of the training objective behind one interface, :class:`Curvature` (``solve(v, damping)``,
``eigvalsh()``), one file per concept (the layout of curvlinops):

* :mod:`.base`: the interface and its dense, block-diagonal, diagonal and identity forms; memory checks;
* :mod:`.exact`: the exact Hessian and Gauss-Newton matrix (= true Fisher in closed form) of a parameter subset;
* :mod:`.fisher`: gradient moments: empirical Fisher (sentence, token, low-rank) and the Monte Carlo true Fisher;
* :mod:`.kfac`: KFAC and EK-FAC;
* :mod:`.inverse`: iHVP solvers without a formed matrix (CG, LiSSA, Arnoldi, DataInf) and the exact HVP operator;
* :mod:`.estimators`: Hutchinson trace, Lanczos lambda_max and whole-network curvature-vector products;
* :mod:`.labels`: the short key of every curvature and its display label (the one table of labels).
"""

from .base import (
    BlockCurvature,
    Curvature,
    Damping,
    DenseCurvature,
    DiagonalCurvature,
    IdentityCurvature,
    available_memory,
    check_dense_fits,
    scale_damping,
)
from .exact import hessian_and_ggn
from .fisher import (
    LowRankCurvature,
    empirical_fisher,
    mc_fisher_errors,
    mc_true_fisher,
    token_empirical_fisher,
)

__all__ = [
    "BlockCurvature", "Curvature", "Damping", "DenseCurvature", "DiagonalCurvature", "IdentityCurvature",
    "LowRankCurvature", "available_memory", "check_dense_fits", "empirical_fisher", "hessian_and_ggn",
    "mc_fisher_errors", "mc_true_fisher", "scale_damping", "token_empirical_fisher",
]
