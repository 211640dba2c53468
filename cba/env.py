"""The environment a run used, recorded beside its metrics."""

from __future__ import annotations

import os
import platform
import sys

import torch

import cba


def environment(device: torch.device | str | None = None) -> dict[str, object]:
    device = torch.device(device) if device is not None else torch.device("cpu")
    info: dict[str, object] = {
        "cba": cba.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info
