"""Type checks of the configuration dataclasses: every field against its annotation.

:func:`check_types` is what each config's ``__post_init__`` runs, so a wrong type from Python,
a JSON file or the command line fails on construction with a message that names the field."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import types
import typing


class _Mismatch(Exception):
    """Internal: a value does not fit an annotation; ``args[0]`` says what was expected and
    ``path`` where inside the value (e.g. ``[2]`` for a tuple's third item)."""

    def __init__(self, expected: str, value, path: str = "", bad_value: bool = False):
        super().__init__(expected)  # bad_value: the right type, a value no field takes (NaN)
        self.value, self.path, self.bad_value = value, path, bad_value


def show_value(value) -> str:
    """A value for an error message: its repr (cut at 80 characters) and its type."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _expected(tp) -> str:
    """What an annotation accepts, in words: 'a bool', 'an int or None', ..."""
    if tp is type(None):
        return "None"
    if _is_union(tp):
        args = typing.get_args(tp)
        # None last: "an int or None"
        args = [a for a in args if a is not type(None)] + [a for a in args if a is type(None)]
        return " or ".join(_expected(a) for a in args)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    if origin is tuple:
        return f"a list or tuple of {_plural(typing.get_args(tp)[0])}"
    if tp is bool:
        return "a bool"
    if tp is int:
        return "an int"
    if tp is float:
        return "a number (int or float)"
    if tp is str:
        return "a str"
    if isinstance(tp, type):
        return f"a {tp.__name__}"
    return str(tp)


def _plural(tp) -> str:
    return {bool: "bools", int: "ints", float: "numbers", str: "strings"}.get(tp, _expected(tp))


def _conform(tp, value):
    """``value`` if it fits the annotation ``tp`` (lists become tuples for ``tuple[T, ...]``,
    integer-like numbers such as numpy ints become ``int``); raises :class:`_Mismatch`."""
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch("None", value)
    if _is_union(tp):
        for arm in typing.get_args(tp):
            try:
                return _conform(arm, value)
            except _Mismatch as e:
                if e.path or e.bad_value:  # the right container, a wrong item / the right type, a bad value
                    raise
        raise _Mismatch(_expected(tp), value)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        # bool == int in Python (True == 1): compare the type as well as the value
        if any(type(value) is type(v) and value == v for v in typing.get_args(tp)):
            return value
        raise _Mismatch(_expected(tp), value)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise NotImplementedError(f"ktm.config checks tuple[T, ...] only, not {tp}")
        if not isinstance(value, (tuple, list)):
            raise _Mismatch(_expected(tp), value)
        items = []
        for i, item in enumerate(value):
            try:
                items.append(_conform(args[0], item))
            except _Mismatch as e:
                raise _Mismatch(e.args[0], e.value, f"[{i}]{e.path}") from None
        return tuple(items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch(_expected(tp), value)
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise _Mismatch(_expected(tp), value)
    if tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
            if math.isfinite(value):  # --lr nan would train to NaN weights and exit 0
                return value if isinstance(value, float) else float(value)
            raise _Mismatch("a finite number", value, bad_value=True)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise _Mismatch(_expected(tp), value)
    if isinstance(tp, type) and origin is None:
        if isinstance(value, tp):
            return value
        raise _Mismatch(_expected(tp), value)
    raise NotImplementedError(f"ktm.config cannot check values of type {tp}: add it to _conform")


def literal_choices(tp) -> tuple | None:
    """The values of a ``Literal[...]`` annotation (also inside ``Optional``), else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None


def check_types(cfg) -> None:
    """Check every field of the dataclass instance ``cfg`` against its annotation.

    bool fields take only bools (not ``"false"`` or 0); int fields ints, not bools; float
    fields finite ints or floats, not bools; ``X | None`` also None; ``tuple[T, ...]`` a tuple or
    list of T (stored as a tuple); ``Literal[...]`` only its values. Raises ``TypeError``
    (``ValueError`` for a ``Literal`` field) naming the field, what it takes and what it got,
    e.g. ``ModelConfig.encoder_norm must be a bool, got 'false' (str)``.
    """
    cls = type(cfg)
    hints = _hints(cls)
    for f in dataclasses.fields(cfg):
        tp, value = hints[f.name], getattr(cfg, f.name)
        try:
            checked = _conform(tp, value)
        except _Mismatch as e:
            where = f"{cls.__name__}.{f.name}{e.path}"
            message = f"{where} must be {e.args[0]}, got {show_value(e.value)}"
            if isinstance(e.value, os.PathLike):
                message += ": convert the path to a str, e.g. str(path)"
            literal = literal_choices(tp) is not None
            raise (ValueError if literal or e.bad_value else TypeError)(message) from None
        if checked is not value:
            object.__setattr__(cfg, f.name, checked)
