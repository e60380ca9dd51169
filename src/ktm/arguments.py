"""The bridge from the typed configs (:mod:`ktm.config`) to argparse: one ``--field-name``
option per dataclass field, and back to the fields that were given."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from .typecheck import literal_choices


def _base_type(tp):
    """(python type, is_optional, is_tuple) of a dataclass field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        t, _, tup = _base_type(args[0])
        return t, True, tup
    if origin is tuple:
        return typing.get_args(tp)[0], False, True
    if origin is typing.Literal:
        return type(typing.get_args(tp)[0]), False, False
    return tp, False, False


def add_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), shown=None,
                  title: str | None = None) -> None:
    """Add one ``--field-name`` option per dataclass field; defaults stay None (= unset).
    A field's metadata gives its ``help`` and, optionally, its ``choices``.

    The help shows each field's value in ``shown`` (a ``cls`` instance, e.g. the default
    recipe's config), else the dataclass default."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(title or cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        t, optional, tup = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        if shown is not None:
            default = getattr(shown, f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, tuple):
            default = " ".join(map(str, default))
        help_ = f.metadata.get("help", "")
        if "default" not in help_ and default is not None:
            help_ += f" (default: {default})"
        choices = f.metadata.get("choices") or literal_choices(hints[f.name])
        if t is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif tup:
            group.add_argument(flag, dest=f.name, nargs="+", type=t, default=None, choices=choices, help=help_)
        else:
            group.add_argument(flag, dest=f.name, type=t, default=None, choices=choices, help=help_)


def overrides(args: argparse.Namespace, cls) -> dict:
    """The fields of ``cls`` that were given on the command line."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if getattr(args, f.name, None) is not None
    }
