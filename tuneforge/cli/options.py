"""Command-line options made from a settings dataclass (serve, eval): each option's default, help, choices and
range come from the field's `_f` metadata, so a default is written once, in the dataclass, and `--help` shows it."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Literal, Union

from tuneforge.config import _check_value


def add_option(parser, cls: type, name: str, *flags: str, **kwargs) -> None:
    """`parser.add_argument` for field `name` of `cls` (flag `--name-with-dashes` unless `flags` are given)."""
    fld = _field(cls, name)
    default = fld.default if fld.default is not dataclasses.MISSING else fld.default_factory()
    if isinstance(default, tuple):  # a tuple field is a comma-separated list on the command line
        default = ",".join(map(str, default)) or None
    hint = _without_none(typing.get_type_hints(cls)[name])
    if typing.get_origin(hint) is Literal:
        kwargs.setdefault("choices", typing.get_args(hint))
    elif hint in (int, float):
        kwargs.setdefault("type", hint)
    help_text = fld.metadata["help"].replace("%", "%%")  # argparse formats help with %
    if default not in (None, ""):
        help_text += " (default: %(default)s)"
    parser.add_argument(*(flags or (_flag(name),)), default=default, help=help_text, **kwargs)


def from_args(cls: type, args, **given):
    """`cls` from the parsed options named like its fields, plus `given` (values the command parsed itself, e.g.
    a comma list as a tuple). An option outside its field's range is a one-line error naming the option."""
    hints = typing.get_type_hints(cls)
    values = {}
    for fld in dataclasses.fields(cls):
        if fld.name in given:
            values[fld.name] = given[fld.name]
        elif hasattr(args, fld.name):
            value = getattr(args, fld.name)
            if fld.metadata.get("min") is not None or fld.metadata.get("max") is not None:
                value = _check_value(_flag(fld.name), value, hints[fld.name], fld.metadata)
            values[fld.name] = value
    return cls(**values)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _without_none(hint):
    """`int | None` -> int; other hints unchanged."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        options = [o for o in typing.get_args(hint) if o is not type(None)]
        if len(options) == 1:
            return options[0]
    return hint
