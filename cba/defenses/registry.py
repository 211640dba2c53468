"""The defense registry, and the one way to build a defense from its params.yaml section."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from cba.defenses.base import Defense
from cba.errors import ConfigError, is_int, is_number
from cba.registry import Registry

DEFENSES: Registry[type[Defense]] = Registry("defenses")


# What each annotation of a defense option accepts, checked before the constructor sees the value.
_OPTION_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (is_int, "an integer"),
    "float": (is_number, "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "float | str": (lambda v: is_number(v) or isinstance(v, str), "a number or a word"),
    "bool | str": (lambda v: isinstance(v, (bool, str)), "true, false or a word"),
    "list[float]": (lambda v: isinstance(v, list) and all(is_number(x) for x in v), "a list of numbers"),
}


def options(name: str) -> dict[str, inspect.Parameter]:
    """The options defense `name` takes: its constructor's keyword arguments."""
    cls = DEFENSES.get(name, key="defense")
    return {p.name: p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"}


def build_defense(name: str, **params: Any) -> Defense:
    cls, signature = DEFENSES.get(name, key="defense"), options(name)
    for key, value in params.items():
        if key not in signature:
            raise ConfigError(key, value, f"{name} takes {', '.join(signature) or 'no options'}")
        accepts, allowed = _OPTION_TYPES.get(str(signature[key].annotation), (lambda v: True, ""))
        if not accepts(value):  # a wrong type would otherwise reach the constructor's comparisons as a traceback
            raise ConfigError(key, value, allowed)
    return cls(**params)
