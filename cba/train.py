"""The one training loop every method uses.

- SGD with linear warmup and a cosine schedule, stepped per iteration.
- channels_last everywhere; bf16 autocast on CUDA.
- A per-sample loss log: every sample's loss in every epoch.
- A checkpoint (safetensors, model + optimizer state) after every epoch. A
  run resumes from the newest one whose fingerprint matches its settings.

Randomness is reseeded from (seed, epoch) at each epoch's start, so a resumed
run replays exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import glob
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn
from cba.progress import tqdm

from cba import distributed
from cba.errors import ConfigError
from cba.fit import lr_at  # noqa: F401  (the schedule, shared with every small fit)
from cba.io import load_tensors, save_tensors
from cba.ssl.base import SSLMethod

EvalFn = Callable[[nn.Module, int], dict[str, float]]


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 256
    lr: float = 0.3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 2
    seed: int = 0
    eval_every: int = 5
    keep_checkpoints: int = 2


@dataclass
class TrainResult:
    losses: np.ndarray  # (epochs, N): each sample's loss in each epoch
    curves: list[dict[str, float]] = field(default_factory=list)  # per-epoch metrics
    resumed_epochs: int = 0  # epochs restored from a checkpoint instead of trained by this call

    @property
    def seconds(self) -> float:
        """Wall time of every epoch, those a resumed run restored included (each row keeps its own)."""
        return float(sum(row.get("seconds", math.nan) for row in self.curves))

    def loss_frame(self, poisoned: np.ndarray | None = None) -> pd.DataFrame:
        epochs, n = self.losses.shape
        poisoned = np.zeros(n, dtype=bool) if poisoned is None else np.asarray(poisoned, dtype=bool)
        return pd.DataFrame({
            "epoch": np.repeat(np.arange(1, epochs + 1), n).astype(np.int32),
            "index": np.tile(np.arange(n), epochs).astype(np.int64),
            "poisoned": np.tile(poisoned, epochs),
            "loss": self.losses.reshape(-1).astype(np.float32),
        })


def epoch_batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """A permutation cut into full batches; the last one is topped up from the
    start of the permutation, so every batch has the same size (contrastive
    losses depend on it) and every sample appears at least once."""
    perm = torch.randperm(n, generator=gen)
    batch_size = min(batch_size, n)
    short = (-n) % batch_size
    if short:
        perm = torch.cat([perm, perm[:short]])
    return list(perm.split(batch_size))


class Checkpointer:
    """Keeps the newest few epoch checkpoints of one run, tagged with its fingerprint.

    File names carry the fingerprint, so a run only ever lists and deletes its
    own files: runs with other settings can share the folder, even at once."""

    def __init__(self, folder: str | Path | None, fingerprint: str, keep: int = 2):
        self.folder = Path(folder) if folder else None
        self.fingerprint, self.keep = fingerprint, keep
        self.prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", fingerprint) + "-epoch_"

    def _path(self, epoch: int) -> Path:
        assert self.folder is not None
        return self.folder / f"{self.prefix}{epoch:04d}.safetensors"

    def files(self) -> list[Path]:
        """This run's checkpoints, oldest first."""
        return sorted(self.folder.glob(f"{glob.escape(self.prefix)}*.safetensors")) if self.folder else []

    def save(self, epoch: int, model: nn.Module, opt: torch.optim.Optimizer, losses: np.ndarray, curves: list[dict]) -> None:
        if self.folder is None:
            return
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        for param_id, param_state in opt.state_dict()["state"].items():
            for name, value in param_state.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{param_id}.{name}"] = value
        tensors["log.losses"] = torch.from_numpy(losses[:epoch].copy())
        meta = {"epoch": str(epoch), "fingerprint": self.fingerprint, "curves": _dumps(curves)}
        save_tensors(self._path(epoch), tensors, metadata=meta)
        for old in self.files()[: -self.keep]:
            old.unlink()

    def load_latest(self, model: nn.Module, opt: torch.optim.Optimizer, losses: np.ndarray) -> tuple[int, list[dict]]:
        """Restore the newest matching checkpoint; return (epochs done, curves)."""
        if self.folder is None or not self.folder.exists():
            return 0, []
        from safetensors import safe_open

        for path in reversed(self.files()):
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
            except Exception:
                continue  # a corrupt checkpoint is skipped, never trusted
            if meta.get("fingerprint") != self.fingerprint:
                continue
            try:
                restored = _restore(load_tensors(path), meta, model, opt, losses)
            except (ConfigError, ValueError, KeyError, RuntimeError, TypeError):
                continue  # right run, bad contents: skipped as corrupt, never half-loaded
            return restored
        return 0, []


def _restore(tensors: dict, meta: dict, model: nn.Module, opt: torch.optim.Optimizer,
             losses: np.ndarray) -> tuple[int, list[dict]]:
    """Check a checkpoint's every part against this run, then load it: nothing is applied unless all fit."""
    epoch = int(meta["epoch"])
    curves = _loads(meta.get("curves", "[]"))
    logged = tensors["log.losses"].numpy()
    if not 1 <= epoch <= len(losses) or logged.shape != (epoch, losses.shape[1]) or not isinstance(curves, list):
        raise ValueError("checkpoint does not fit this run")
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    own = model.state_dict()
    if set(weights) != set(own) or any(tuple(weights[k].shape) != tuple(own[k].shape) for k in own):
        raise ValueError("checkpoint weights do not fit the model")
    state = opt.state_dict()
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, param_id, name = key.split(".", 2)
            state["state"].setdefault(int(param_id), {})[name] = value
    opt.load_state_dict(state)  # first: it can still refuse; the model's fit was checked above
    model.load_state_dict(weights)
    losses[:epoch] = logged
    return epoch, curves


def _dumps(obj) -> str:
    return json.dumps(obj)


def _loads(text: str):
    return json.loads(text)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def train(
    method: SSLMethod,
    images: np.ndarray,
    labels: np.ndarray,
    augment: nn.Module,
    config: TrainConfig,
    device: torch.device,
    evaluate: EvalFn | None = None,
    checkpointer: Checkpointer | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train `method` on uint8 images (N, H, W, 3); return the loss log and curves.

    Under torchrun each rank trains on its shard of every global batch (see
    cba.distributed); every rank keeps the whole loss log, and only rank 0
    evaluates, checkpoints and shows progress."""
    n = len(images)
    ranks = distributed.ranks()
    if min(config.batch_size, n) % ranks.world_size:
        raise ConfigError("batch_size", config.batch_size, f"a multiple of the {ranks.world_size} processes")
    method.to(device).to(memory_format=torch.channels_last)
    distributed.synchronise_batchnorm(method, device)
    augment.to(device)
    data = torch.as_tensor(images).permute(0, 3, 1, 2).contiguous().to(device)  # uint8 stays compact
    targets = torch.as_tensor(labels).long().to(device)
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    losses = np.full((config.epochs, n), np.nan, dtype=np.float32)
    checkpointer = checkpointer or Checkpointer(None, "")
    start_epoch, curves = checkpointer.load_latest(method, opt, losses)
    runner = distributed.wrap(method, device)  # after loading: DDP copies rank 0's weights to every rank
    if start_epoch and ranks.is_main:
        print(f"resuming from the checkpoint of epoch {start_epoch} of {config.epochs}", file=sys.stderr, flush=True)
    steps_per_epoch = math.ceil(n / min(config.batch_size, n))
    total_steps = steps_per_epoch * config.epochs
    use_amp = device.type == "cuda"

    bar = tqdm(range(start_epoch, config.epochs), desc="pretrain", unit="epoch", disable=not (progress and ranks.is_main),
               initial=start_epoch, total=config.epochs)
    for epoch in bar:
        epoch_started = time.perf_counter()
        # Each rank draws its own augmentations; rank 0 draws what a single process would.
        seed_everything(config.seed * 100_003 + epoch + 7_919 * ranks.rank)
        gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        method.train()
        seen = torch.zeros(n, dtype=torch.bool)
        epoch_loss = 0.0
        batches = epoch_batches(n, config.batch_size, gen)
        for step, idx in enumerate(batches):
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * steps_per_epoch + step, total_steps, config.warmup_epochs * steps_per_epoch, config.lr)
            local = distributed.shard(idx).to(device)
            x = data[local].float().div_(255)
            views = [augment(x).contiguous(memory_format=torch.channels_last) for _ in range(method.num_views)]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss, per_sample = runner(views, targets[local])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            method.after_step((epoch * steps_per_epoch + step + 1) / total_steps)
            # Log each sample once per epoch (top-up duplicates are skipped).
            fresh = ~seen[idx]
            per_sample = distributed.gather_detached(per_sample.float()).cpu()  # back in global batch order
            losses[epoch, idx[fresh].numpy()] = per_sample[fresh].numpy()
            seen[idx] = True
            value = distributed.mean_over_ranks(float(loss.detach()))
            if not math.isfinite(value):
                # Stop before a NaN checkpoint is written: NaN weights later read as ASR 1.0.
                raise ConfigError("lr", config.lr, f"a smaller rate: the loss became {value} at epoch {epoch + 1}, "
                                  f"step {step + 1} of {len(batches)}; lower the learning rate or add warm-up epochs")
            epoch_loss += value
        row = {"epoch": epoch + 1, "loss": epoch_loss / len(batches), "lr": opt.param_groups[0]["lr"]}
        if evaluate is not None and ranks.is_main and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs):
            row.update(evaluate(method.encoder, epoch + 1))
        row["seconds"] = time.perf_counter() - epoch_started  # saved with the curves, so a resumed run still knows it
        curves.append(row)
        bar.set_postfix({k: round(v, 3) for k, v in row.items() if k not in ("epoch", "seconds")})
        if ranks.is_main:
            checkpointer.save(epoch + 1, method, opt, losses, curves)
    return TrainResult(losses, curves, start_epoch)
