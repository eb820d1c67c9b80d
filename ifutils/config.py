"""Checks shared by the configuration dataclasses (values often arrive as notebook parameters)."""

from __future__ import annotations

import dataclasses
import types
import typing


def validate_fields(config) -> None:
    """Check every field of a dataclass against its annotation (int, float, str, bool, tuples of them,
    ``X | None``); an int is accepted where a float is expected.

    Raises:
        TypeError: naming the field, the value received and the type expected.
    """
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value, expected = getattr(config, field.name), hints[field.name]
        if not _matches(value, expected):
            raise TypeError(
                f"{type(config).__name__}.{field.name} must be {_name(expected)}, got {value!r} "
                f"({type(value).__name__}); pass e.g. -p {field.name} <{_name(expected)}> to papermill"
            )


def require_positive(config, *names: str) -> None:
    """Raise ValueError naming the first of ``names`` whose value is below 1."""
    for name in names:
        if getattr(config, name) < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be >= 1, got {getattr(config, name)}")


def _matches(value, expected) -> bool:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, (tuple, list)) and all(_matches(v, args[0]) for v in value)
    if expected is type(None):
        return value is None
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _name(expected) -> str:
    args = typing.get_args(expected)
    if typing.get_origin(expected) is tuple:
        return f"a tuple of {_name(args[0])}"
    if args:
        return " or ".join(_name(a) for a in args)
    return "None" if expected is type(None) else expected.__name__
