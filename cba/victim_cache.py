"""A folder of trained victims, so that a bench does not train the same one twice.

Benches train victims in-process (`cba.attack.run_attack`), and many of them
train one that an earlier run already trained: `bench/target_sweep.py` trains
the same clean victim in every sweep. With a cache folder, `run_attack` keys
each victim by everything its weights depend on and keeps, per key, the
trained method's weights (safetensors; never a pickle), its per-sample loss
log (parquet), its curves and its before-repair ACC/ASR. A later call with the
same key rebuilds the record from them instead of training.

The key covers the training settings, the training and test data (digests
of the images and labels; the test set because the stored ACC/ASR are read
on it), the trigger (name, parameters and tensors: the poisons
depend on them), the device type, and a digest of the source files of the
`cba` modules a victim's training and its stored readings can run
(`VICTIM_CODE`), so that a change to any of them makes a new key: a cache
never serves weights trained by other code. Modules no victim runs (the
analysis, the defenses, the benches' readings) are left out, so that editing
them keeps the cache; a test runs every method through `run_attack` in a
fresh interpreter and fails if it loads a `cba` module the list leaves out. A victim without poisons does not depend on
the trigger or the target class, so its key leaves them out and one clean
victim serves every trigger.

A cached victim is checked when it is loaded: the rebuilt record's ACC and
ASR must equal the ones stored with it (a clean victim's ACC only: its ASR
depends on the trigger it is read with, which its key leaves out). An entry that fails the check, or
cannot be read, is trained again and replaced. Entries are written whole
(to a temporary folder, then renamed), so a reader never sees half of one.
Two processes that may train the same victim at once should share a lock
(the test suite's BadNets fixture holds a `filelock.FileLock`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cba.data.base import ImageSet
from cba.env import source_digest
from cba.io import load_tensors, save_tensors
from cba.triggers import Trigger

WEIGHTS, LOSSES, META = "model.safetensors", "losses.parquet", "meta.json"
# The files and folders of `cba` whose code a victim's weights and stored readings can depend on: every module
# `run_attack` loads, for any method, mode and trigger (tests/test_victim_cache.py keeps the list complete).
VICTIM_CODE = ("__init__.py", "attack.py", "augment.py", "data", "distributed.py", "env.py", "errors.py",
               "evaluate.py", "fit.py", "io.py", "models", "params_file.py", "poison.py", "probe.py", "progress.py",
               "record.py", "registry.py", "ssl", "train.py", "triggers", "victim_cache.py")


def _array_digest(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype}{array.shape}".encode() + array.tobytes())
    return digest.hexdigest()


def trigger_digest(trigger: Trigger) -> str:
    """What a trigger does to images: its name, parameters, seed, image size and tensors."""
    tensors = trigger.tensors()
    return hashlib.sha256(json.dumps(trigger.config(), sort_keys=True, default=str).encode()
                          + _array_digest(*(tensors[k].numpy() for k in sorted(tensors))).encode()).hexdigest()


def _is_clean(settings: dict[str, Any]) -> bool:
    """A victim without poisons: its key, and so its check, leave out the trigger and the target."""
    return float(settings.get("poison_rate", 0)) == 0


def matches_stored(settings: dict[str, Any], rebuilt: dict[str, float], stored: dict[str, float]) -> bool:
    """Whether a loaded victim's before-repair figures are the stored ones: all of them, or a clean victim's ACC
    alone, since its ASR depends on the trigger it is read with, which its key leaves out."""
    checked = ("acc",) if _is_clean(settings) else tuple(stored)
    return all(rebuilt.get(k) == stored.get(k) for k in checked)


def victim_key(settings: dict[str, Any], train: ImageSet, test: ImageSet, trigger: Trigger, device: torch.device,
               code: str | None = None) -> str:
    """The cache key of a victim trained with `settings` (run_attack's keywords) on `train`.

    The test set is part of it because the entry's stored ACC/ASR, which a load must reproduce, are read on it."""
    clean = _is_clean(settings)
    chosen = {k: v for k, v in settings.items() if not (clean and k == "target_class")}
    parts = [chosen, _array_digest(train.images, train.labels), _array_digest(test.images, test.labels),
             None if clean else trigger_digest(trigger), torch.device(device).type,
             code or source_digest(entries=VICTIM_CODE)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def save_victim(folder: Path, model: nn.Module, losses: pd.DataFrame | None, curves: list[dict[str, Any]],
                train_seconds: float | None, baseline: dict[str, float]) -> None:
    """Write one entry whole: into a temporary sibling folder, then renamed onto `folder`."""
    part = folder.with_name(folder.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    save_tensors(part / WEIGHTS, model.state_dict())
    if losses is not None:
        losses.to_parquet(part / LOSSES)
    (part / META).write_text(json.dumps({"curves": curves, "train_seconds": train_seconds, "baseline": baseline}))
    shutil.rmtree(folder, ignore_errors=True)
    part.rename(folder)


def load_victim(folder: Path, model: nn.Module) -> dict[str, Any] | None:
    """Load an entry's weights into `model`; return its losses, curves, seconds and baseline, or None when the
    entry is missing or unreadable (the caller trains instead)."""
    if not (folder / WEIGHTS).is_file() or not (folder / META).is_file():
        return None
    try:
        model.load_state_dict(load_tensors(folder / WEIGHTS))
        meta = json.loads((folder / META).read_text())
        losses = pd.read_parquet(folder / LOSSES) if (folder / LOSSES).is_file() else None
        return {"losses": losses, "curves": list(meta["curves"]), "train_seconds": meta["train_seconds"],
                "baseline": dict(meta["baseline"])}
    except Exception:  # a corrupt entry is retrained, never trusted
        return None
