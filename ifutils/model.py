"""Word-level LSTM language model: embedding -> LSTM -> linear decoder (Zaremba et al. 2014).

The hidden state starts at zero for every sentence, so a sample's loss depends on that sample
alone, which per-sample influence needs. Two numerically equal LSTM paths share the same weights:
``nn.LSTM`` (fast fused kernel, used for training) and :func:`unrolled_lstm` (plain tensor ops,
supports ``torch.func.vmap`` and forward-mode AD, used for every influence computation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class ModelConfig:
    """Architecture of :class:`LSTMLM`.

    Attributes:
        vocab_size: number of word types V (10,000 for PTB).
        emb_dim: embedding width E.
        hidden: LSTM width H.
        num_layers: stacked LSTM layers.
        dropout: dropout on embeddings and LSTM outputs during training (off in eval mode).
    """

    vocab_size: int
    emb_dim: int = 256
    hidden: int = 256
    num_layers: int = 1
    dropout: float = 0.25

    def to_dict(self) -> dict:
        return asdict(self)


def unrolled_lstm(lstm: nn.LSTM, x: torch.Tensor) -> torch.Tensor:
    """Run ``lstm``'s weights step by step from a zero state (PyTorch's LSTM equations).

    i, f, g, o = split(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh); c_t = s(f) c_{t-1} + s(i) tanh(g);
    h_t = s(o) tanh(c_t), with s the logistic sigmoid (``torch.nn.LSTM`` documentation).

    Args:
        lstm: a unidirectional, ``batch_first`` ``nn.LSTM`` without projections; its parameters are
            read as attributes, so ``torch.func.functional_call`` can substitute them.
        x: (..., L, E) float inputs; any leading batch dims (or none, under ``vmap``).
    Returns:
        (..., L, H) hidden states of the last layer, equal to ``lstm(x)[0]`` up to rounding.
    """
    out = x
    for layer in range(lstm.num_layers):
        w_ih = getattr(lstm, f"weight_ih_l{layer}")
        w_hh = getattr(lstm, f"weight_hh_l{layer}")
        bias = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
        pre = out @ w_ih.T + bias  # input part of all gates, all steps at once
        h = pre.new_zeros(pre.shape[:-2] + (lstm.hidden_size,))
        c = h
        states = []
        for t in range(pre.shape[-2]):
            i, f, g, o = (pre[..., t, :] + h @ w_hh.T).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            states.append(h)
        out = torch.stack(states, dim=-2)
    return out


class LSTMLM(nn.Module):
    """Embedding -> ``num_layers`` LSTM -> dropout -> linear decoder to V logits.

    Parameter names (used to pick influence subsets): ``embedding.weight`` (V, E),
    ``lstm.weight_ih_l{k}`` (4H, E or H), ``lstm.weight_hh_l{k}`` (4H, H), ``lstm.bias_ih_l{k}``,
    ``lstm.bias_hh_l{k}`` (4H,), ``decoder.weight`` (V, H), ``decoder.bias`` (V,).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.emb_dim)
        self.lstm = nn.LSTM(config.emb_dim, config.hidden, config.num_layers, batch_first=True)
        self.drop = nn.Dropout(config.dropout)
        self.decoder = nn.Linear(config.hidden, config.vocab_size)

    def forward(self, inputs: torch.Tensor, *, unrolled: bool = False, return_hidden: bool = False) -> torch.Tensor:
        """Logits for next-word prediction.

        Args:
            inputs: (B, L) or, with ``unrolled=True``, (..., L) int64 word ids.
            unrolled: use :func:`unrolled_lstm` (vmap- and jvp-friendly) instead of ``nn.LSTM``.
            return_hidden: return the last LSTM layer's states instead of logits.
        Returns:
            (..., L, V) float logits, or (..., L, H) hidden states with ``return_hidden``.
        """
        x = self.drop(self.embedding(inputs))
        h = unrolled_lstm(self.lstm, x) if unrolled else self.lstm(x)[0]
        h = self.drop(h)
        return h if return_hidden else self.decoder(h)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(..., L) negative log-likelihood in nats of each target under softmax(logits)."""
    return -torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def sentence_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample loss: mean token NLL over the real tokens of each sentence.

    l_i = (1 / T_i) sum_{t: mask[i, t]} -log p(y_it | y_i,<t), in nats per token.

    Args:
        logits: (..., L, V); targets: (..., L) int64; mask: (..., L) bool, True at real tokens.
    Returns:
        (...,) float. Padded positions never enter: they are zeroed before the sum, so their
        logits and targets can hold anything finite.
    """
    nll = torch.where(mask, token_nll(logits, targets), 0.0)
    return nll.sum(-1) / mask.sum(-1)
