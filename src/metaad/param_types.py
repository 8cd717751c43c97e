"""Whether a value conforms to a constructor argument's annotation: the check behind ``--param``, torch-free so
that the command line can answer a wrong-typed value before torch loads."""

from __future__ import annotations

import collections.abc
import os
import types
import typing
from pathlib import Path
from typing import Any

# the names an annotation of a method's constructor may use, for annotations read as text from the source
ANNOTATION_NAMES = {"Any": Any, "Sequence": collections.abc.Sequence, "Path": Path, "Literal": typing.Literal,
                    "Optional": typing.Optional, "Union": typing.Union}


def annotation_from_text(text: str) -> Any:
    """The annotation written as ``text`` (``"float | None"``), or None where it names something else."""
    try:
        return eval(text, {"__builtins__": {"int": int, "float": float, "str": str, "bool": bool, "tuple": tuple,
                                            "list": list, "dict": dict, "None": None}}, dict(ANNOTATION_NAMES))
    except Exception:  # a class of the library's own (a module, a data type): not checked here
        return None


def conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as JSON gives it: lists for tuples, integers for floats) fits ``hint``; an annotation
    this cannot read accepts anything."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str | os.PathLike)
    if origin is typing.Literal:
        return value in args
    if origin in (tuple, list):
        if not isinstance(value, tuple | list):
            return False
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            return all(conforms(v, args[0]) for v in value) if args else True
        return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args, strict=True))
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint) or (issubclass(hint, os.PathLike) and isinstance(value, str))
    return True
