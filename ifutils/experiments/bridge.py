"""The bridge from the whole network to the 512-coordinate subset (issue 14, item 6): restricted to the subset of
today's comparison, the whole-network code reproduces the subset numbers.

Three checks on the trained model and the comparison's own samples (:func:`~ifutils.experiments.comparison.choose_samples`
with the default :class:`~ifutils.experiments.comparison.InfluenceConfig`):

1. per-sample gradients: :class:`~ifutils.network.NetworkGrads` over the subset's whole tensor, read at the subset's
   coordinates, against :func:`ifutils.grads.per_sample_grads` of the :class:`~ifutils.subset.SubsetLoss`
   (max |difference| / max |g| over every training and test sentence);
2. curvature: the whole-network H and GGN products (:class:`~ifutils.curvature.estimators.CurvatureProducts`) with
   ``probes`` seeded random vectors supported on the subset, read at the subset, against the subset's exact H and
   GGN from the structured pass (:func:`ifutils.curvature.hessian_and_ggn`) times the same vectors;
3. the numbers: influence I = -g_test^T (C + lambda I)^{-1} g_train with the whole-network gradients, for C = H,
   GGN, sentence EF (formed from the whole-network gradients of the n_H sentences) and the identity, and the
   agreement of each with H (Spearman, Pearson, top-k), beside the committed values of ``results/ptb.json``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..curvature import IdentityCurvature, empirical_fisher, hessian_and_ggn
from ..curvature.estimators import CurvatureProducts
from ..grads import per_sample_grads
from ..influence import influence
from ..metrics import agreement
from ..network import NetworkGrads
from ..progress import progress
from ..subset import SubsetLoss, default_subset
from .comparison import InfluenceConfig, choose_samples

COMPARED = ("hessian", "ggn", "ef", "identity")


def _restricted_grads(net: NetworkGrads, sentences, name: str, index: torch.Tensor, chunk_size: int) -> torch.Tensor:
    out = torch.empty(len(sentences), len(index), dtype=torch.float64)
    for idx, g in progress(net.chunks(sentences, chunk_size), desc="whole-network gradients",
                           total=-(-len(sentences) // chunk_size), unit="chunk"):
        out[idx] = g[:, index].double().cpu()
    return out


def subset_bridge(model, corpus, committed: dict | None = None, config: InfluenceConfig | None = None,
                  probes: int = 4, damping: float = 1e-4, cache_dir=None) -> dict:
    """Run the three checks of the module docstring.

    Args:
        model: the trained LSTMLM of the comparison (eval mode). corpus: its corpus.
        committed: the ``influence`` section of the comparison's results file, for the committed values.
        config: the comparison's configuration (default: the default one; only the recurrent subset is bridged).
        probes: random subset-supported vectors of check 2. damping: lambda of check 3 (absolute).
        cache_dir: the chunk cache the comparison used (the subset gradients and the structured H, GGN are read
            from it when present).
    Returns:
        dict: ``grads_max_rel_diff``, ``products`` ({"H", "F"}: max relative difference), ``agreement`` ({key:
        {"whole_network": metrics, "committed": metrics or None}}), ``damping``, sizes.
    Raises:
        ValueError: a subset spread over several tensors (this bridge reads one tensor).
    """
    config = config or InfluenceConfig()
    eos = corpus.vocab.stoi["<eos>"]
    samples = choose_samples(corpus, config)
    subset = default_subset(model, config.subset, config.num_coords, config.seed)
    if len(subset.names) != 1:
        raise ValueError(f"the bridge reads one parameter tensor, the subset spans {subset.names}")
    name, index = subset.names[0], subset.indices[subset.names[0]]
    loss = SubsetLoss(model, subset, eos, getattr(torch, config.dtype))
    net = NetworkGrads(model, eos, names=[name])
    g_train = _restricted_grads(net, samples["train"], name, index, config.chunk_size)
    g_test = _restricted_grads(net, samples["test"], name, index, config.chunk_size)
    s_train = per_sample_grads(loss, samples["train"], config.chunk_size, cache_dir=cache_dir).double()
    s_test = per_sample_grads(loss, samples["test"], config.chunk_size, cache_dir=cache_dir).double()
    both, sub = torch.cat([g_train, g_test]), torch.cat([s_train, s_test])
    grads_diff = float((both - sub).abs().max() / sub.abs().max())
    hess, ggn = hessian_and_ggn(loss, samples["hessian"], cache_dir=cache_dir)
    products = CurvatureProducts(model, samples["hessian"], eos, names=[name])
    shape = dict(model.named_parameters())[name].shape
    gen = torch.Generator().manual_seed(config.seed)
    diffs = {"H": 0.0, "F": 0.0}
    for _ in progress(range(probes), desc="whole-network products on the subset", unit="probe"):
        v = torch.randn(len(index), generator=gen, dtype=torch.float64)
        full = torch.zeros(shape.numel(), dtype=products.params[name].dtype)
        full[index] = v.to(full.dtype)
        for key, dense in (("H", hess), ("F", ggn)):
            got = products.matvec(key)(full).double()[index]
            want = dense.matrix @ v
            diffs[key] = max(diffs[key], float((got - want).norm() / want.norm()))
    lengths = torch.tensor([len(s) for s in samples["hessian"]])
    curvatures = {"hessian": hess, "ggn": ggn, "ef": empirical_fisher(g_train[: config.n_hessian], lengths),
                  "identity": IdentityCurvature(len(index))}
    ref = influence(g_train, g_test, hess, damping)
    rows = {}
    for key in COMPARED:
        got = agreement(ref, influence(g_train, g_test, curvatures[key], damping), config.top_k)
        was = None
        if committed is not None:
            match = [r for r in committed.get("agreement", []) if r["curvature"] == key and r["mode"] == "absolute"
                     and np.isclose(r["damping"], damping)]
            was = {k: match[0][k] for k in ("spearman", "pearson", "top_k_harmful", "top_k_helpful")} if match else None
        rows[key] = {"whole_network": {k: got[k] for k in ("spearman", "pearson", "top_k_harmful", "top_k_helpful")},
                     "committed": was}
    return {"subset": subset.to_dict(), "n_train": len(g_train), "n_test": len(g_test), "n_hessian": config.n_hessian,
            "damping": damping, "grads_max_rel_diff": grads_diff, "products": diffs, "probes": probes,
            "agreement": rows}


def format_bridge(bridge: dict) -> str:
    """Markdown: the three checks, with the committed numbers beside the whole-network code's."""
    lines = [f"Subset {bridge['subset']['names']} (p = {bridge['subset']['p']}), {bridge['n_train']} training and "
             f"{bridge['n_test']} test sentences, n_H = {bridge['n_hessian']}: per-sample gradients from the "
             f"whole-network code differ from the subset code's by {bridge['grads_max_rel_diff']:.1e} (max, relative "
             f"to the largest); whole-network H and GGN products on {bridge['probes']} subset-supported probes differ "
             f"from the subset's structured matrices by {bridge['products']['H']:.1e} and {bridge['products']['F']:.1e} "
             f"(relative norm).", "",
             f"| C (lambda = {bridge['damping']:g}) | Spearman with H: whole-network code | committed (subset code) | "
             f"Pearson: whole-network | committed |", "|---|---|---|---|---|"]
    from ..curvature.labels import label

    for key, r in bridge["agreement"].items():
        c = r["committed"] or {}
        lines.append(f"| {label(key)} | {r['whole_network']['spearman']:.4f} | {c.get('spearman', float('nan')):.4f} | "
                     f"{r['whole_network']['pearson']:.4f} | {c.get('pearson', float('nan')):.4f} |")
    return "\n".join(lines)
