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
            if typing.get_origin(expected) is tuple:  # papermill's -p passes a string; a list needs its YAML option
                how = f"pass a list with papermill's YAML option, e.g. -y '{field.name}: [1, 2, 4]' (-p gives a string)"
            else:
                how = f"pass e.g. -p {field.name} <{_name(expected)}> to papermill"
            raise TypeError(f"{type(config).__name__}.{field.name} must be {_name(expected)}, got {value!r} "
                            f"({type(value).__name__}); {how}")


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


def param(default, help: str):
    """A dataclass field with its default and its help string (``metadata["help"]``), the one source of both
    for :func:`add_arguments`, the notebooks' parameter cells (checked by tests/test_config.py) and the docs."""
    return dataclasses.field(default=default, metadata={"help": help})


def defaults(cls) -> dict:
    """``{field name: default}`` of a dataclass, for the fields that have a default."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def add_arguments(parser, cls, *, exclude=(), prefix: str = "", **overrides) -> None:
    """Add one ``--<prefix><field-name>`` option per field of the dataclass ``cls`` to an ``argparse`` parser,
    with the field's type, default and ``metadata["help"]``.

    Tuples become ``nargs="+"``, booleans ``--x/--no-x`` (``argparse.BooleanOptionalAction``), ``X | None`` an
    option of type X whose default is None. Fields without a default (``ModelConfig.vocab_size``) and the names in
    ``exclude`` are skipped; ``overrides`` replaces a field's default for this entry point (a study that must
    reproduce its committed results pins the values it ran with) and says so in the help.

    Raises:
        ValueError: an override names no field of ``cls``.
    """
    import argparse

    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if unknown := set(overrides) - names:
        raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}; choose from {sorted(names)}")
    for field in dataclasses.fields(cls):
        if field.name in exclude or field.default is dataclasses.MISSING:
            continue
        hint, default = hints[field.name], overrides.get(field.name, field.default)
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint
        kwargs: dict = {"default": default, "dest": prefix.replace("-", "_") + field.name}
        if typing.get_origin(base) is tuple:
            kwargs.update(type=typing.get_args(base)[0], nargs="+")
        elif base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = base
        pinned = f"; this command pins {default!r} (dataclass default {field.default!r})" if field.name in overrides else ""
        kwargs["help"] = f"{field.metadata.get('help', '')} (default: {default!r}{pinned})".replace("%", "%%")
        parser.add_argument(f"--{prefix}{field.name.replace('_', '-')}", **kwargs)


def from_args(cls, namespace, *, prefix: str = "", **extra):
    """Build ``cls`` from the options :func:`add_arguments` added (lists back to tuples), plus ``extra`` fields."""
    values = vars(namespace)
    kwargs = {}
    for field in dataclasses.fields(cls):
        key = prefix.replace("-", "_") + field.name
        if key in values:
            value = values[key]
            kwargs[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**{**kwargs, **extra})
