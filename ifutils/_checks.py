"""Argument checks shared by the public entry points: each raises an error that names the argument, what was
passed and what to pass instead (issue 13, item 4). Internal: the public functions document what they raise."""

from __future__ import annotations

import numbers

import torch


def _shown(value) -> str:
    """``type 'repr'`` of a value, shortened, for messages."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def check_damping(damping, name: str = "damping"):
    """A damping is a real number >= 0 or a tensor of them; strings, None, complex numbers and arrays are refused.

    Returns the damping unchanged (a NumPy scalar becomes a float).

    Raises:
        TypeError: not a real number or a tensor (the message shows what was given and how to convert it).
        ValueError: a negative or NaN number.
    """
    if torch.is_tensor(damping):
        if damping.is_complex() or damping.dtype == torch.bool:
            raise TypeError(f"{name} must be a float >= 0 or a (p,) float tensor, got a {damping.dtype} tensor")
        return damping
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real):
        hint = ""
        if isinstance(damping, str):
            hint = f"; pass a number, e.g. {name}=float({damping!r})"
        elif damping is None:
            hint = "; pass a number such as 1e-3 (0.0 for no damping), or curvature.relative_damping(alpha)"
        elif type(damping).__module__.startswith("numpy"):
            hint = f"; pass a float, or torch.from_numpy({name}) for per-coordinate dampings"
        raise TypeError(f"{name} must be a float >= 0 or a (p,) tensor of them, got {_shown(damping)}{hint}")
    if not damping >= 0:
        raise ValueError(f"{name} must be >= 0, got {damping}; pass a non-negative float such as 1e-3")
    return float(damping)


def check_tensor(value, name: str, what: str = "(n, p) tensor") -> torch.Tensor:
    """Refuse a non-tensor (a NumPy array, a list) where a torch tensor is expected.

    Raises:
        TypeError: naming ``name`` and the conversion to use.
    """
    if torch.is_tensor(value):
        return value
    if type(value).__module__.startswith("numpy"):
        fix = f"convert it with torch.from_numpy({name})"
    elif isinstance(value, (list, tuple)):
        fix = f"convert it with torch.stack({name}) or torch.tensor({name})"
    else:
        fix = "pass a torch tensor"
    raise TypeError(f"{name} must be a torch {what}, got {type(value).__module__}.{type(value).__name__}; {fix}")


def check_finite_rows(t: torch.Tensor, name: str, rows: str = "rows", fix: str = "") -> None:
    """Raise FloatingPointError listing the rows of ``t`` (up to 20) that hold NaN or Inf.

    Args:
        rows: what a row is, e.g. ``"rows (samples)"``; fix: a hint appended to the message.
    """
    if t.numel() and not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).reshape(len(t), -1).any(dim=1).nonzero().flatten().tolist()
        raise FloatingPointError(f"{name} has NaN/Inf in {rows} {bad[:20]} ({len(bad)} of {len(t)}){fix}")


def check_token_ids(sentences, vocab_size: int, name: str = "sentences") -> None:
    """Every sample is a 1-D integer tensor of ids in [0, vocab_size).

    Raises:
        TypeError: a sample is not an integer torch tensor (the message names its index).
        IndexError: an id is negative or >= ``vocab_size`` (the message names the sample, the id and the range).
    """
    for i, s in enumerate(sentences):
        if not torch.is_tensor(s) or s.is_floating_point() or s.is_complex() or s.dtype == torch.bool:
            kind = f"a {s.dtype} tensor" if torch.is_tensor(s) else type(s).__name__
            raise TypeError(f"{name}[{i}] is {kind}; each sample must be a 1-D int64 tensor of word ids, "
                            f"e.g. vocab.encode(words) or torch.tensor(ids, dtype=torch.long)")
    if not len(sentences):
        return
    ids = torch.cat([s.reshape(-1) for s in sentences])
    if not len(ids):
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = next(i for i, s in enumerate(sentences) if len(s.reshape(-1)) and (s.min() < 0 or s.max() >= vocab_size))
        wrong = [int(w) for w in sentences[bad].reshape(-1) if not 0 <= w < vocab_size]
        raise IndexError(f"{name}[{bad}] holds word id {wrong[0]}, outside the vocabulary's range "
                         f"0..{vocab_size - 1}; encode text with the checkpoint's vocabulary (vocab.encode) and "
                         f"keep ids in [0, vocab_size)")


def check_token_id(value, vocab_size: int, name: str = "eos_id") -> int:
    """One word id: an int in [0, vocab_size). Returns it as a Python int.

    Raises:
        TypeError: not an integer (a word string, a float); the message says to pass ``vocab.stoi[word]``.
        ValueError: outside [0, vocab_size).
    """
    if torch.is_tensor(value) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        hint = f'vocab.stoi[{value!r}]' if isinstance(value, str) else 'vocab.stoi["<eos>"]'
        raise TypeError(f"{name} must be an int word id, got {_shown(value)}; pass {hint}")
    if not 0 <= value < vocab_size:
        raise ValueError(f"{name}={value} is outside the vocabulary's range 0..{vocab_size - 1}; "
                         f'pass vocab.stoi["<eos>"] of the vocabulary the model was trained with')
    return int(value)


def check_names(names, name: str = "names") -> list[str]:
    """A list (or tuple) of strings; a bare string is refused rather than read as a list of characters.

    Raises:
        TypeError: ``names`` is a string or not a sequence of strings.
    """
    if isinstance(names, str):
        raise TypeError(f"{name} must be a list of parameter names, got the string {names!r}; pass [{names!r}]")
    try:
        names = list(names)
    except TypeError:
        raise TypeError(f"{name} must be a list of parameter names, got {_shown(names)}") from None
    wrong = [n for n in names if not isinstance(n, str)]
    if wrong:
        raise TypeError(f"{name} must hold parameter-name strings, got {_shown(wrong[0])}; "
                        f"see [n for n, _ in model.named_parameters()]")
    return names


def check_finite_parameters(
    named: dict[str, torch.Tensor], where: str = "the model",
    fix: str = "The weights are the cause: reload the checkpoint (load_checkpoint) or retrain with a smaller learning "
               "rate",
) -> None:
    """Refuse NaN/Inf weights before any gradient is taken, naming the tensors (``fix``: what to do, appended).

    Raises:
        FloatingPointError: naming each non-finite tensor and its count of bad entries.
    """
    bad = {n: int((~torch.isfinite(t)).sum()) for n, t in named.items() if t.is_floating_point() and not torch.isfinite(t).all()}
    if bad:
        listed = ", ".join(f"{n} ({k} of {named[n].numel()} entries)" for n, k in list(bad.items())[:10])
        raise FloatingPointError(
            f"{where} has NaN/Inf parameters: {listed}; every gradient would be non-finite. {fix}"
        )
