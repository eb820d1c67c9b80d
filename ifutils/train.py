"""Training the LSTM language model with Adam, one checkpoint per epoch, resumable."""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import param, require_positive, validate_fields
from .data import Corpus, bucket_batches, make_batch
from .io import check_corpus, load_checkpoint, save_checkpoint
from .model import LSTMLM, ModelConfig, sentence_loss, token_nll
from .progress import log, progress


@dataclass
class TrainConfig:
    """Optimisation settings.

    Attributes:
        epochs: passes over the training sentences.
        batch_size: sentences per batch (bucketed by length).
        lr: Adam learning rate, halved after any epoch whose validation perplexity did not improve.
        clip: gradient-norm clipping threshold.
        seed: seeds initialisation, batch order and dropout.
        max_train_sentences: train on the first N sentences only (smoke runs); None for all.
        keep_epochs: also keep a copy of the checkpoint after every epoch k, ``<stem>_epoch<k>.pt`` beside it
            (early, middle and final models for robustness sweeps). It does not change training, so it is not
            compared when resuming, and checkpoints written before it existed still resume.
    """

    epochs: int = param(5, "passes over the training sentences")
    batch_size: int = param(32, "sentences per batch (bucketed by length)")
    lr: float = param(2e-3, "Adam learning rate, halved after an epoch without validation improvement")
    clip: float = param(1.0, "gradient-norm clipping threshold")
    seed: int = param(0, "seeds initialisation, batch order and dropout")
    max_train_sentences: int | None = param(None, "train on the first N sentences only (e.g. 2000 for a smoke run); None: all")
    keep_epochs: bool = param(False, "also keep <stem>_epoch<k>.pt after every epoch k")

    def __post_init__(self):
        validate_fields(self)
        require_positive(self, "epochs", "batch_size")


@torch.no_grad()
def perplexity(model: LSTMLM, sentences: list[torch.Tensor], eos_id: int, batch_size: int = 128) -> float:
    """exp(total NLL / total tokens) over ``sentences``, each started from a zero state.

    Units: per-token perplexity; every sentence contributes its words and one ``<eos>``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for idx in bucket_batches([len(s) for s in sentences], batch_size):
        inputs, targets, mask = (t.to(device) for t in make_batch([sentences[i] for i in idx], eos_id))
        nll = torch.where(mask, token_nll(model(inputs), targets), 0.0)
        total += nll.sum().item()
        count += mask.sum().item()
    model.train(was_training)
    return math.exp(total / count)


def train_language_model(
    corpus: Corpus,
    model_config: ModelConfig,
    config: TrainConfig,
    checkpoint_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    init: LSTMLM | None = None,
) -> tuple[LSTMLM, list[dict]]:
    """Train (or resume training) an :class:`LSTMLM` on ``corpus``.

    The loss minimised is the mean over a batch's sentences of the per-sentence mean token NLL
    (:func:`ifutils.model.sentence_loss`), matching the per-sample loss used for influence.
    After each epoch the checkpoint at ``checkpoint_path`` is rewritten atomically with weights,
    optimiser and RNG state and the history; an existing checkpoint for the same configuration is
    resumed from its last finished epoch (so a killed run loses at most one epoch); asking for more
    epochs than a finished checkpoint has extends it. With ``config.keep_epochs`` each epoch k is also saved,
    atomically and before the main checkpoint (so a resumed run never skips one), to ``<stem>_epoch<k><suffix>``.
    ``init`` (a model of the same configuration) gives the starting weights instead of the seeded initialisation
    (continued training, e.g. the second task of a continual-learning stream); the optimiser starts afresh. A
    resumed run ignores it (the checkpoint holds the weights).

    Returns:
        (model in eval mode, history) where history holds one dict per epoch with
        ``train_loss`` (nats/token, batch-averaged), ``valid_ppl``, ``lr`` and ``seconds``.
    Raises:
        FloatingPointError: a non-finite training loss; the last good checkpoint is kept.
        ValueError: the checkpoint on disk was written with another configuration or dataset.
    """
    eos_id = corpus.vocab.stoi["<eos>"]
    train = corpus.splits["train"][: config.max_train_sentences]
    torch.manual_seed(config.seed)
    model = LSTMLM(model_config).to(device)
    if init is not None:
        if init.config.to_dict() != model_config.to_dict():
            raise ValueError(f"init has another configuration ({init.config.to_dict()}) than {model_config.to_dict()}")
        model.load_state_dict({k: v.to(device) for k, v in init.state_dict().items()})
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    history: list[dict] = []
    if Path(checkpoint_path).is_file():
        _, _, payload = load_checkpoint(checkpoint_path, device)
        unchecked = ("epochs", "keep_epochs")  # neither changes the weights of the epochs already trained
        saved = {**payload["model_config"], **{k: v for k, v in payload["train_config"].items() if k not in unchecked}}
        wanted = {**model_config.to_dict(), **{k: v for k, v in asdict(config).items() if k not in unchecked}}
        differ = [f"{k}={saved.get(k)!r}" for k in wanted if saved.get(k) != wanted[k]]
        if differ:
            raise ValueError(
                f"{checkpoint_path} was trained with another configuration ({', '.join(differ)}); "
                f"delete it or pick another checkpoint path"
            )
        check_corpus(payload, corpus)
        model.load_state_dict(payload["state_dict"])
        optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["rng_state"])
        history = payload["history"]
    for epoch in range(len(history), config.epochs):
        start = time.perf_counter()
        model.train()
        generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        batches = bucket_batches([len(s) for s in train], config.batch_size, shuffle=True, generator=generator)
        running, bar = 0.0, progress(batches, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False)
        for step, idx in enumerate(bar, 1):
            inputs, targets, mask = (t.to(device) for t in make_batch([train[i] for i in idx], eos_id))
            loss = sentence_loss(model(inputs), targets, mask).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite training loss {loss.item()} at epoch {epoch + 1}, step {step}; the last "
                    f"good checkpoint ({len(history)} epochs) is kept at {checkpoint_path}. Lower lr or clip."
                )
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            optimizer.step()
            running += loss.item()
            bar.set_postfix(loss=f"{running / step:.3f}", refresh=False)
        valid_ppl = perplexity(model, corpus.splits["valid"], eos_id)
        lr = optimizer.param_groups[0]["lr"]
        history.append(
            {"epoch": epoch + 1, "train_loss": running / len(batches), "valid_ppl": valid_ppl, "lr": lr,
             "seconds": time.perf_counter() - start}
        )
        if epoch > 0 and valid_ppl >= min(h["valid_ppl"] for h in history[:-1]):
            for group in optimizer.param_groups:
                group["lr"] = lr / 2
        log(f"epoch {epoch + 1}: train loss {history[-1]['train_loss']:.3f}, valid ppl {valid_ppl:.1f}")
        state = {"train_config": asdict(config), "optimizer": optimizer.state_dict(), "rng_state": torch.get_rng_state(),
                 "history": history, "dataset": corpus.name, "window": corpus.window}
        if config.keep_epochs:
            path = Path(checkpoint_path)
            save_checkpoint(path.with_name(f"{path.stem}_epoch{epoch + 1}{path.suffix}"), model, corpus.vocab, **state)
        save_checkpoint(checkpoint_path, model, corpus.vocab, **state)
    model.eval()
    return model, history
