"""The pretraining-method registry, and the one way to build a method with its options checked."""

from __future__ import annotations

import inspect
import math
from typing import Any

from torch import nn

from cba.errors import ConfigError, is_int, is_number
from cba.registry import Registry
from cba.ssl.base import SSLMethod

METHODS: Registry[type[SSLMethod]] = Registry("method")


def build_method(name: str, backbone: nn.Module, num_classes: int = 10, **hparams: Any) -> SSLMethod:
    cls = METHODS.get(name, key="method")
    signature = inspect.signature(cls.__init__).parameters
    allowed = [p for p in signature if p not in ("self", "backbone", "num_classes")]
    for key, value in hparams.items():
        if key not in allowed:
            raise ConfigError(key, value, f"{name} takes {', '.join(allowed) or 'no options'}")
        _check_option(key, value, signature[key].default)
    return cls(backbone, num_classes=num_classes, **hparams)


# Sizes cap what a typo can make us allocate: a 10^9-wide projector would take the machine down.
MAX_OPTION_SIZE = 1 << 20


def _check_option(key: str, value: Any, default: Any) -> None:
    """A method option has its default's type: integer options are sizes (>= 1), float options are
    rates, momenta or temperatures (finite, >= 0; momenta and smoothing at most 1, temperatures > 0)."""
    name = key.rsplit(".", 1)[-1]
    if isinstance(default, bool):
        ok, allowed = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, allowed = is_int(value) and 1 <= value <= MAX_OPTION_SIZE, f"an integer in [1, {MAX_OPTION_SIZE}]"
    elif isinstance(default, float):
        high = 1.0 if ("momentum" in name or "smoothing" in name) else math.inf
        low_ok = (lambda v: v > 0) if "temperature" in name else (lambda v: v >= 0)
        ok = is_number(value) and low_ok(value) and value <= high
        allowed = "a number " + ("> 0" if "temperature" in name else ">= 0") + (" and <= 1" if high == 1.0 else "")
    else:
        return
    if not ok:
        raise ConfigError(key, value, allowed)
