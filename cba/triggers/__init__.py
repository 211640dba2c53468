"""Trigger registry: patch (BadNets), blend, ctrl (CTRL frequency), ssl_patch (SSL-Backdoor).

Build with `build_trigger(name, params, seed, image_size)`; every trigger maps a
uint8 (N, H, W, 3) batch to a triggered copy and saves as safetensors + json.
"""

from cba.triggers.base import Trigger
from cba.triggers.io import load_trigger, save_trigger
from cba.triggers.registry import TRIGGERS, build_trigger

# Imported for their registration side effect.
from cba.triggers import blend, ctrl, generated, optimized, patch, ssl_patch  # noqa: E402,F401  isort: skip

__all__ = ["TRIGGERS", "Trigger", "build_trigger", "load_trigger", "save_trigger"]
