"""Typed, validated access to params.yaml.

Every lookup names its dotted key, so a bad value fails with one line such as
`pretrain.epochs='ten' is not valid: an integer >= 1`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable


from cba.errors import DEVICE_CHOICES, ConfigError, is_device
from cba.params_file import load_params_file

_MISSING = object()


class Params:
    def __init__(self, data: dict[str, Any], source: str = "params.yaml"):
        self.data, self.source = data, source

    @classmethod
    def load(cls, path: str | Path) -> "Params":
        return cls(load_params_file(path), str(path))

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        node: Any = self.data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is _MISSING:
                    raise ConfigError(key, None, f"missing from {self.source}")
                return default
            node = node[part]
        return node

    def section(self, key: str, allowed: Iterable[str] | None = None) -> dict[str, Any]:
        """A mapping; with `allowed`, unknown keys (typos) are an error."""
        value = self.raw(key, {}) or {}
        if not isinstance(value, dict):
            raise ConfigError(key, value, "a mapping")
        if allowed is not None:
            allowed = list(allowed)
            for name in value:
                if name not in allowed:
                    raise ConfigError(f"{key}.{name}", value[name], f"not a known key; allowed: {', '.join(allowed)}")
        return dict(value)

    def device(self, key: str, default: str = "auto") -> str:
        """auto, cpu, cuda or cuda:N, and a requested GPU must exist here: checked before any work."""
        value = self.raw(key, default)
        if not is_device(value):
            raise ConfigError(key, value, DEVICE_CHOICES)
        match = re.fullmatch(r"cuda(?::(\d+))?", value)
        if match:
            import torch  # only when a GPU is asked for

            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = int(match.group(1) or 0)
            if index >= count:
                raise ConfigError(key, value, f"a GPU this machine has ({count} visible); use auto or cpu")
        return value

    def integer(self, key: str, default: Any = _MISSING, low: int | None = None, high: int | None = None) -> int:
        value = self.raw(key, default)
        ok = isinstance(value, int) and not isinstance(value, bool)
        ok = ok and (low is None or value >= low) and (high is None or value <= high)
        if not ok:
            raise ConfigError(key, value, _range_text("an integer", low, high))
        return value

    def number(self, key: str, default: Any = _MISSING, low: float | None = None, high: float | None = None, open_low: bool = False) -> float:
        value = self.raw(key, default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (low is None or (value > low if open_low else value >= low)) and (high is None or value <= high)
        if not ok:
            raise ConfigError(key, value, _range_text("a number", low, high, open_low))
        return float(value)

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise ConfigError(key, value, "true or false")
        return value

    def choice(self, key: str, options: Iterable[str], default: Any = _MISSING) -> str:
        value = self.raw(key, default)
        options = list(options)
        if value not in options:
            raise ConfigError(key, value, f"choose one of {', '.join(map(str, options))}")
        return value

    def text(self, key: str, default: Any = _MISSING, check: Callable[[str], bool] | None = None, allowed: str = "a string") -> str | None:
        value = self.raw(key, default)
        if value is not None and (not isinstance(value, str) or (check is not None and not check(value))):
            raise ConfigError(key, value, allowed)
        return value


def _range_text(kind: str, low: float | None, high: float | None, open_low: bool = False) -> str:
    if low is not None and high is not None:
        return f"{kind} in {'(' if open_low else '['}{low}, {high}]"
    if low is not None:
        return f"{kind} {'>' if open_low else '>='} {low}"
    if high is not None:
        return f"{kind} <= {high}"
    return kind
