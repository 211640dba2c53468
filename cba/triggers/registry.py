"""The trigger registry and the one entry point the stages call."""

from __future__ import annotations

from typing import Any, Mapping

from cba.errors import ConfigError
from cba.registry import Registry
from cba.triggers.base import Trigger

TRIGGERS: Registry[type[Trigger]] = Registry("name")


def build_trigger(name: str, params: Mapping[str, Any] | None, seed: int, image_size: int = 32) -> Trigger:
    """Build trigger `name`; unknown or invalid params raise ConfigError."""
    cls = TRIGGERS.get(name, key="name")
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise ConfigError("params", params, "must be a mapping of parameter names to values")
    params = dict(params)
    cls.check_param_names(params)  # before the call, so a stray 'seed' key is a ConfigError too
    return cls(seed=seed, image_size=image_size, **params)
