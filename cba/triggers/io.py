"""A trigger on disk: its data as safetensors and how to rebuild it as JSON (never a pickle)."""

from __future__ import annotations

import os
from pathlib import Path

from cba.errors import ConfigError
from cba.io import load_tensors, read_json, save_tensors, write_json
from cba.triggers.base import JSON_FILE, TENSORS_FILE, Trigger
from cba.triggers.registry import build_trigger


def save_trigger(trigger: Trigger, folder: str | os.PathLike) -> None:
    """Write `trigger.safetensors` (the data) and `trigger.json` (how to rebuild it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / TENSORS_FILE, trigger.tensors(), metadata={"trigger": trigger.name})
    write_json(folder / JSON_FILE, trigger.config())


def load_trigger(folder: str | os.PathLike) -> Trigger:
    """Rebuild a trigger from its json, then adopt the saved tensors as its data."""
    folder = Path(folder)
    config = read_json(folder / JSON_FILE)
    missing = [k for k in ("name", "params", "seed", "image_size") if not isinstance(config, dict) or k not in config]
    if missing:
        raise ConfigError("path", str(folder / JSON_FILE), f"not a trigger file: missing {', '.join(missing)}")
    trigger = build_trigger(config["name"], config["params"], seed=config["seed"], image_size=config["image_size"])
    tensors_path = folder / TENSORS_FILE
    trigger.set_tensors(load_tensors(tensors_path), source=str(tensors_path))
    return trigger
