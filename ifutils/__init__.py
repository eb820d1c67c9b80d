"""ifutils: Fisher-based and exact-Hessian influence functions for LSTM language models.

The core library, importable as ``from ifutils import ...``: corpora and vocabulary (:mod:`.data`), the LSTM LM
(:mod:`.model`), training and perplexity (:mod:`.train`), parameter subsets and the subset loss (:mod:`.subset`),
per-sample gradients (:mod:`.grads`), curvatures behind one interface (:mod:`.curvature`), influence
(:mod:`.influence`), exact re-solves (:mod:`.resolve`), metrics (:mod:`.metrics`) and checkpoints (:mod:`.io`).
The studies this project runs with it live in :mod:`ifutils.experiments`, which the core never imports.

Sign convention (Koh & Liang 2017, eq. 2): I(z_i, z_test) = -g_test^T (C + lambda I)^{-1} g_i; a positive score
means up-weighting z_i raises the test loss (z_i is harmful). kronfluence, dattri and pyDVL report the opposite sign.
"""

from .curvature import (
    BlockCurvature,
    Curvature,
    DenseCurvature,
    DiagonalCurvature,
    IdentityCurvature,
    LowRankCurvature,
    empirical_fisher,
    hessian_and_ggn,
    mc_true_fisher,
    token_empirical_fisher,
)
from .curvature.inverse import (
    ArnoldiCurvature,
    DataInfCurvature,
    OperatorCurvature,
    hvp_operator,
)
from .curvature.kfac import ekfac_curvature, fit_kfac, kfac_curvature
from .data import Corpus, Vocabulary, load_corpus, tokenize
from .grads import per_sample_grads, per_token_grads
from .influence import gradient_similarity, influence, outlier_scores, self_influence
from .io import load_checkpoint, resolve_device, save_checkpoint
from .metrics import agreement
from .model import LSTMLM, ModelConfig
from .subset import ParamSubset, SubsetLoss, default_subset, select_subset
from .train import TrainConfig, perplexity, train_language_model

__all__ = [
    "LSTMLM", "ArnoldiCurvature", "BlockCurvature", "Corpus", "Curvature", "DataInfCurvature", "DenseCurvature",
    "DiagonalCurvature", "IdentityCurvature", "LowRankCurvature", "ModelConfig", "OperatorCurvature", "ParamSubset",
    "SubsetLoss", "TrainConfig", "Vocabulary", "agreement", "default_subset", "ekfac_curvature", "empirical_fisher",
    "fit_kfac", "gradient_similarity", "hessian_and_ggn", "hvp_operator", "influence", "kfac_curvature",
    "load_checkpoint", "load_corpus", "mc_true_fisher", "outlier_scores", "per_sample_grads", "per_token_grads",
    "perplexity", "resolve_device", "save_checkpoint", "select_subset", "self_influence", "token_empirical_fisher",
    "tokenize", "train_language_model",
]
