"""Kronecker-factored curvatures, KFAC and EK-FAC, for the decoder and the last LSTM layer's gate matrices.

A linear map s_t = W a_t (decoder: a_t = h_t, s_t = logits; LSTM gates: a_t = x_t for ``weight_ih`` or
h_{t-1} for ``weight_hh``, s_t = the 4H gate pre-activations) has per-token gradient delta_t a_t^T, with
delta_t = d(sentence NLL)/d s_t. Treating the time steps of a sentence as independent, the simplest of the
options of Martens, Ba, Johnson (ICLR 2018, sec. 3.1, "independent time steps"), the GGN/true-Fisher block
of W is approximated by (Martens & Grosse 2015, eq. 1-2)

    F_W ~ G (x) A,   A = sum_t w_t a_t a_t^T,   G = sum_t w_t E_y[delta_t delta_t^T],   w_t = 1 / (n T_i),

so that sum_t w_t = 1 and the scale matches the mean-token-loss objective (``ifutils.curvature``). W's
coordinates are ordered row-major, vec(W)[r * d_in + c] = W[r, c], hence G (x) A: F_W[(r, c), (r', c')] ~
G[r, r'] A[c, c'] (Martens & Grosse write A (x) G for the column-major vec). Biases form their own block with
a_t = 1 (A = [[1]]): the weight-bias cross terms are dropped, where Martens & Grosse append a constant 1 to a_t
instead.

* ``labels="model"`` (true Fisher): for the decoder E_y[delta delta^T] = diag(p_t) - p_t p_t^T in closed form;
  for the LSTM gates delta_t is back-propagated from labels drawn from the model, ``mc_samples`` draws.
* ``labels="data"``: the real labels (empirical-Fisher KFAC). Its G is then a token-level EF factor while the
  EK-FAC eigenvalues are fitted to sentence-level gradients, as EK-FAC prescribes for its examples.

EK-FAC (George, Laurent, Bouthillier, Ballas, Vincent 2018, eq. 8-10) keeps the eigenbasis
Q = Q_G (x) Q_A of the KFAC factors and re-fits the eigenvalues to the per-example (per-sentence) gradients
S_i = sum_t delta_t a_t^T: Lambda*[k, l] = (1/n) sum_i (1/T_i) E_y[(Q_G^T S_i Q_A)[k, l]^2]. For the decoder
with model labels the expectation is exact: sum_t w_t (q_k^T Lambda_t q_k) (q'_l^T a_t)^2.

Only the rows R and columns C of W touched by the parameter subset enter: the factors are G[R, R] and
A[C, C]. A principal sub-matrix of G (x) A on a row/column grid is G[R, R] (x) A[C, C], so KFAC restricted
to the subset is exactly the full-layer KFAC restricted. EK-FAC is that of the sub-layer W[R, C] (its
eigenbasis is that of the restricted factors), restricted to the subset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.func import grad, vmap

from ..cache import derive_seed
from ..model import token_nll
from ..subset import SubsetLoss, sample_labels
from .base import BlockCurvature, check_dense_fits

LABELS = ("model", "data")


@dataclass
class LayerFactors:
    """KFAC factors of one parameter tensor, restricted to the rows and columns the subset touches.

    Attributes:
        name: parameter name, e.g. ``"lstm.weight_hh_l0"``.
        positions: (p_l,) positions of the tensor's subset coordinates in theta_S.
        rows, cols: (p_l,) each coordinate's index into G and into A.
        out_rows, in_cols: (r,) and (c,) the touched rows/columns of W (``in_cols`` is [0] for a bias).
        A: (c, c) float64 input factor; G: (r, r) float64 output-gradient factor.
        eigenvalues: (r, c) float64 EK-FAC eigenvalues in the basis Q_G (x) Q_A, once fitted.
    """

    name: str
    positions: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    out_rows: torch.Tensor
    in_cols: torch.Tensor
    A: torch.Tensor | None = None
    G: torch.Tensor | None = None
    eigenvalues: torch.Tensor | None = None

    def eigenbases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q_G (r, r), Q_A (c, c)) eigenvectors of the factors."""
        return torch.linalg.eigh(self.G)[1], torch.linalg.eigh(self.A)[1]

    def kfac_block(self) -> torch.Tensor:
        """(p_l, p_l) A[c_a, c_b] G[r_a, r_b], KFAC restricted to the subset coordinates."""
        return self.A[self.cols[:, None], self.cols] * self.G[self.rows[:, None], self.rows]

    def ekfac_block(self, k_chunk: int = 16) -> torch.Tensor:
        """(p_l, p_l) Z diag(Lambda*) Z^T with Z[a, (k, l)] = Q_G[r_a, k] Q_A[c_a, l]; chunked over k to bound memory."""
        qg, qa = self.eigenbases()
        qg, qa = qg[self.rows], qa[self.cols]
        out = qg.new_zeros(len(self.rows), len(self.rows))
        for k in range(0, qg.shape[1], k_chunk):
            z = (qg[:, k : k + k_chunk, None] * qa[:, None, :]).flatten(1)
            out += (z * self.eigenvalues[k : k + k_chunk].flatten()) @ z.T
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the factors (and EK-FAC eigenvalues) held."""
        return sum(t.numel() * t.element_size() for t in (self.A, self.G, self.eigenvalues) if t is not None)


def uncovered_tensors(loss: SubsetLoss) -> list[str]:
    """Subset tensors KFAC does not cover (it covers the decoder and the last LSTM layer); empty when it covers all."""
    last = loss.model.config.num_layers - 1
    supported = {f"lstm.{k}_l{last}" for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    supported |= {"decoder.weight", "decoder.bias"}
    return [n for n in loss.blocks() if n not in supported]


def _layers(loss: SubsetLoss) -> list[LayerFactors]:
    unknown = uncovered_tensors(loss)
    if unknown:
        raise ValueError(f"KFAC covers the decoder and the last LSTM layer; the subset also holds {unknown}. "
                         f"Drop them from the subset")
    layers = []
    for name, positions in loss.blocks().items():
        idx, base = loss.indices[name].cpu(), loss.base[name]
        rows, cols = (idx // base.shape[1], idx % base.shape[1]) if base.dim() == 2 else (idx, torch.zeros_like(idx))
        out_rows, in_cols = rows.unique(), cols.unique()
        layers.append(LayerFactors(name, positions, torch.searchsorted(out_rows, rows),
                                   torch.searchsorted(in_cols, cols), out_rows, in_cols))
    return layers


def token_signals(
    loss: SubsetLoss, theta: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
    need_gates: bool = True,
) -> dict[str, torch.Tensor]:
    """Layer inputs and output gradients of every token, for a padded batch.

    Args:
        inputs, targets, mask: (B, L) batch (``make_batch``); targets may be sampled labels.
        need_gates: also back-propagate to the gate pre-activations (skipped for a decoder-only subset).
    Returns:
        dict of (B, L, .) tensors: ``x`` last-layer inputs, ``h_prev`` h_{t-1} (zero at t = 0), ``h`` states,
        ``probs`` softmax, ``delta_logits`` = probs - onehot(targets), and with ``need_gates``
        ``delta_gates`` = d(sentence NLL)/d(gate pre-activations) (4H); both deltas are zero at padding.
    """
    model, deltas = loss.model, loss.deltas(theta)
    with torch.no_grad():
        x, h = model.states(inputs, deltas)
        logits = loss.logits(theta, inputs)
        probs = torch.softmax(logits, -1)
        onehot = torch.nn.functional.one_hot(targets, probs.shape[-1]).to(probs.dtype)
    out = {"x": x, "h": h, "h_prev": torch.nn.functional.pad(h, (0, 0, 1, 0))[..., :-1, :], "probs": probs,
           "delta_logits": (probs - onehot) * mask[..., None]}
    if need_gates:
        def sentence_nll(shift, inp, tgt, msk):
            return torch.where(msk, token_nll(loss.logits(theta, inp, gate_shift=shift), tgt), 0.0).sum()

        shift = x.new_zeros(x.shape[:-1] + (4 * model.config.hidden,))
        out["delta_gates"] = vmap(grad(sentence_nll))(shift, inputs, targets, mask)
    return out


def _layer_tokens(layer: LayerFactors, signals: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(a (B, L, c), delta (B, L, r)) of one layer, restricted to its touched columns and rows, float64."""
    name = layer.name
    delta = signals["delta_logits" if name.startswith("decoder.") else "delta_gates"][..., layer.out_rows]
    if "bias" in name:
        a = delta.new_ones(delta.shape[:-1] + (1,))
    else:
        a = signals["h" if name == "decoder.weight" else "x" if "weight_ih" in name else "h_prev"][..., layer.in_cols]
    return a.double(), delta.double()


def _closed_form(layer: LayerFactors, labels: str) -> bool:
    """The decoder's E_y[delta delta^T] = diag(p) - p p^T is exact and cheap; the gates need sampled labels."""
    return labels == "model" and layer.name.startswith("decoder.")


def fit_kfac(
    loss: SubsetLoss,
    sentences: list[torch.Tensor],
    labels: str = "model",
    mc_samples: int = 1,
    seed: int = 0,
    chunk_size: int = 16,
    ekfac: bool = True,
    theta: torch.Tensor | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> list[LayerFactors]:
    """Fit KFAC factors (one pass) and, with ``ekfac``, the EK-FAC eigenvalues (a second pass) on the n_H sentences.

    Args:
        loss: subset loss whose tensors are all decoder or last-LSTM-layer parameters.
        sentences: the n_H sentences every curvature is estimated from.
        labels: ``"model"`` (true Fisher: closed form for the decoder, ``mc_samples`` label draws for the gates)
            or ``"data"`` (empirical Fisher, the real labels).
        mc_samples: label draws per position for the gate factors; draw d of chunk j is seeded by
            (seed, d, j), the same in both passes.
        theta: (p,) point of evaluation, default ``loss.theta0``.
        cache_dir: if given, each finished pass is stored, and a rerun loads it.
    Returns:
        One :class:`LayerFactors` per subset tensor, in ``loss.subset.names`` order.
    Raises:
        ValueError: unknown ``labels``, ``mc_samples < 1``, or a subset tensor KFAC does not cover.
    """
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
    theta = loss.theta0 if theta is None else theta
    layers = _layers(loss)
    cache = loss.cache(cache_dir, {"stage": "KFAC", "labels": labels, "mc_samples": mc_samples, "seed": seed,
                                   "chunk_size": chunk_size}, theta, sentences, code=__name__)

    def run_pass(name: str, ekfac_pass: bool) -> dict[str, torch.Tensor]:
        stored = cache.get(name) if cache else None
        if stored is None:
            desc = "EK-FAC eigenvalues" if ekfac_pass else "KFAC factors"
            stored = _accumulate(loss, sentences, layers, labels, mc_samples, seed, chunk_size, theta, ekfac_pass, desc)
            if cache:
                cache.put(name, stored)
        return {k: v.to(theta.device) for k, v in stored.items()}  # the cache holds CPU tensors

    factors = run_pass("factors", ekfac_pass=False)
    for layer in layers:
        layer.A, layer.G = factors[f"{layer.name}.A"], factors[f"{layer.name}.G"]
    if ekfac:
        eigenvalues = run_pass("eigenvalues", ekfac_pass=True)
        for layer in layers:
            layer.eigenvalues = eigenvalues[f"{layer.name}.eigenvalues"]
    return layers


def _accumulate(
    loss, sentences, layers, labels, mc_samples, seed, chunk_size, theta, ekfac: bool, desc: str
) -> dict[str, torch.Tensor]:
    """One pass: the factors A and G, or with ``ekfac`` the EK-FAC eigenvalues in the factors' eigenbases."""
    bases = {layer.name: layer.eigenbases() for layer in layers} if ekfac else {}
    need_gates = any(layer.name.startswith("lstm.") for layer in layers)
    sample = labels == "model" and need_gates  # the decoder's closed form needs no labels
    draws = mc_samples if sample else 1
    n = len(sentences)
    sums: dict[str, torch.Tensor] = {}

    def add(key, value):
        sums[key] = sums[key] + value if key in sums else value

    for j, (_, inputs, targets, mask) in enumerate(loss.batches(sentences, chunk_size, desc)):
        w = mask.double() / (n * mask.sum(-1, keepdim=True).double())  # 1 / (n T_i) at real tokens
        for d in range(draws):
            if sample:
                with torch.no_grad():
                    generator = torch.Generator().manual_seed(derive_seed(seed, d, j))
                    targets = sample_labels(loss.logits(theta, inputs), generator)
            signals = token_signals(loss, theta, inputs, targets, mask, need_gates)
            for layer in layers:
                a, delta = _layer_tokens(layer, signals)
                exact = _closed_form(layer, labels)
                if exact and d > 0:
                    continue  # the closed form does not depend on the draw
                scale = 1.0 if exact else 1.0 / draws
                probs = signals["probs"][..., layer.out_rows].double() if exact else None
                if not ekfac:
                    if d == 0:
                        add(f"{layer.name}.A", torch.einsum("blc,bld,bl->cd", a, a, w))
                    g = (torch.diag(torch.einsum("blr,bl->r", probs, w)) - torch.einsum("blr,bls,bl->rs", probs, probs, w)
                         if exact else torch.einsum("blr,bls,bl->rs", delta, delta, w))
                    add(f"{layer.name}.G", scale * g)
                    continue
                q_g, q_a = bases[layer.name]
                if exact:  # E_y (q_k^T delta_t)^2 = q_k^T Lambda_t q_k, cross-token terms vanish
                    dg = probs @ q_g**2 - (probs @ q_g) ** 2
                    lam = torch.einsum("blr,blc,bl->rc", dg, (a @ q_a) ** 2, w)
                else:  # per-sentence gradients S_i = sum_t delta_t a_t^T in the eigenbasis
                    s = q_g.T @ torch.einsum("blr,blc,bl->brc", delta, a, mask.double()) @ q_a
                    lam = torch.einsum("brc,b->rc", s**2, 1 / (n * mask.sum(-1).double()))
                add(f"{layer.name}.eigenvalues", scale * lam)
    return {k: v.cpu() for k, v in sums.items()}


def kfac_curvature(layers: list[LayerFactors], p: int, name: str = "kfac") -> "KroneckerCurvature":
    """KFAC restricted to the subset: block-diagonal over layers, block l = G_l[R, R] (x) A_l[C, C] on the
    layer's coordinates. Relative damping is per layer: alpha * tr(A) tr(G) / (c r), the mean eigenvalue of
    G (x) A (one damping per layer as kronfluence, whose heuristic without a given damping is alpha = 0.1).

    Args:
        layers: fitted factors (:func:`fit_kfac`); p: subset size.
    Returns:
        :class:`KroneckerCurvature`.
    """
    return KroneckerCurvature(layers, p, name, [layer.kfac_block() for layer in layers],
                     [float(layer.A.trace() * layer.G.trace() / (len(layer.A) * len(layer.G))) for layer in layers])


def ekfac_curvature(layers: list[LayerFactors], p: int, name: str = "ekfac") -> "KroneckerCurvature":
    """EK-FAC restricted to the subset (module docstring); per-layer relative damping alpha * mean(Lambda*_l),
    kronfluence's heuristic (without a given damping) with alpha = 0.1.

    Raises:
        ValueError: the eigenvalues were not fitted (``fit_kfac(..., ekfac=True)``).
    """
    if any(layer.eigenvalues is None for layer in layers):
        raise ValueError("EK-FAC eigenvalues are missing; fit with fit_kfac(..., ekfac=True)")
    return KroneckerCurvature(layers, p, name, [layer.ekfac_block() for layer in layers],
                     [float(layer.eigenvalues.mean()) for layer in layers])


class KroneckerCurvature(BlockCurvature):
    """KFAC or EK-FAC restricted to the subset, held densely (p x p) for the solves.

    ``nbytes`` counts the factors (A, G and EK-FAC eigenvalues), the memory the method needs at any scale;
    the dense p x p restriction exists only because the comparison is on a subset. Positive semi-definite by
    construction (``psd``): a Kronecker product of PSD factors, or an eigenbasis with eigenvalues that are means of
    squares, restricted to principal sub-matrices.

    Raises:
        MemoryError: the dense p x p matrices would not fit on the factors' device (:func:`check_dense_fits`).
    """

    def __init__(self, layers: list[LayerFactors], p: int, name: str, blocks: list[torch.Tensor], scales: list[float]):
        device = layers[0].A.device
        check_dense_fits(p, 2, device)
        matrix = torch.zeros(p, p, dtype=torch.float64, device=device)
        for layer, block in zip(layers, blocks):
            matrix[layer.positions[:, None], layer.positions] = block
        super().__init__(matrix, [layer.positions for layer in layers], name, scales, psd=True)
        self.layers = layers

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)
