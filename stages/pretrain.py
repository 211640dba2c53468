"""`cba pretrain`: self-supervised (or supervised) pretraining on the poisoned set."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from cba.augment import KINDS, build_augment
from cba.data.checksum import file_digest
from cba.env import environment, source_digest
from cba.errors import ConfigError, in_section, is_number
from cba import distributed
from cba.evaluate import knn_backdoor_metrics
from cba.io import write_csv, write_parquet
from cba.models import BACKBONES, build_backbone
from cba.models.io import save_encoder
from cba.poison import triggered_test_set
from cba.ssl import METHODS, build_method
from cba.ssl.io import save_method
from cba.train import Checkpointer, TrainConfig, train
from cba.triggers import load_trigger
from cba.triggers.base import JSON_FILE as TRIGGER_JSON, TENSORS_FILE as TRIGGER_TENSORS
from stages.common import (PROGRESS_OPTION, DETAILS_DIR, METRICS_DIR, PARAMS_OPTION, PLOTS_DIR, POISON_DIR,
                           PRETRAIN_DIR, TRIGGER_DIR, check_outputs, check_target, load_stage_set, one_line_errors,
                           write_metrics, read_manifest)
from stages.params import Params

KEYS = ["method", "backbone", "width", "epochs", "batch_size", "lr", "momentum", "weight_decay", "warmup_epochs",
        "augmentation", "eval_every", "eval_bank_size", "device", *METHODS.names()]


def read_config(params: Params) -> tuple[TrainConfig, dict]:
    params.section("pretrain", KEYS)
    seed = params.integer("seed", 0, low=0, high=2**32 - 1)
    method = params.choice("pretrain.method", METHODS.names())
    config = TrainConfig(
        epochs=params.integer("pretrain.epochs", low=1),
        batch_size=params.integer("pretrain.batch_size", low=2),
        lr=learning_rate(params, method),
        momentum=params.number("pretrain.momentum", 0.9, low=0.0, high=1.0),
        weight_decay=params.number("pretrain.weight_decay", 5e-4, low=0.0),
        warmup_epochs=params.integer("pretrain.warmup_epochs", 2, low=0),
        seed=seed,
        eval_every=params.integer("pretrain.eval_every", 5, low=1),
    )
    params.section("pretrain.augmentation", ["kind", "per_batch", "min_scale"])
    extra = {
        "method": method,
        "backbone": params.choice("pretrain.backbone", BACKBONES.names()),
        "width": params.integer("pretrain.width", low=1),
        "augmentation": params.choice("pretrain.augmentation.kind", ("auto", *KINDS), "auto"),
        "per_batch": params.boolean("pretrain.augmentation.per_batch", False),
        "min_scale": params.number("pretrain.augmentation.min_scale", 0.5, low=0.0, high=1.0, open_low=True),
        "eval_bank_size": params.integer("pretrain.eval_bank_size", 5000, low=1),
        "device": params.device("pretrain.device"),
        "target_class": params.integer("target_class", low=0),
    }
    extra["hparams"] = params.section(f"pretrain.{extra['method']}")
    # Check the method's options now, on a throwaway one-channel backbone, before any data is read.
    with in_section(f"pretrain.{method}", extra["hparams"]):
        build_method(method, build_backbone("convnet", width=1), num_classes=2, **extra["hparams"])
    return config, extra


LOSS_LOG_BYTES = 2 << 30  # the per-sample loss log (epochs x images float32) must fit in memory


def check_loss_log(epochs: int, images: int) -> None:
    if epochs * images * 4 > LOSS_LOG_BYTES:
        raise ConfigError("pretrain.epochs", epochs,
                          f"at most {LOSS_LOG_BYTES // (4 * images)} for {images} training images "
                          "(the per-sample loss log keeps epochs x images floats, 2 GiB at most)")


def learning_rate(params: Params, method: str) -> float:
    """`pretrain.lr`: a positive number, or auto for the method's own SGD rate at batch size 256."""
    if params.raw("pretrain.lr") == "auto":
        return METHODS.get(method).default_lr
    value = params.raw("pretrain.lr")
    if not (is_number(value) and value > 0):
        raise ConfigError("pretrain.lr", value, "a number > 0, or auto (the method's own rate: "
                          + ", ".join(f"{name} {METHODS.get(name).default_lr:g}" for name in METHODS.names()) + ")")
    return float(value)


# The code that shapes the weights (dvc.yaml's pretrain deps inside the package): a checkpoint
# written by other code must never be resumed as this code's result.
# What a checkpoint's contents depend on: the training code, and evaluate.py, which scores the kNN curves it carries.
TRAINING_CODE = ("train.py", "fit.py", "distributed.py", "augment.py", "ssl", "models", "evaluate.py")


def run_fingerprint(config: TrainConfig, extra: dict, data_digest: str) -> str:
    """Identifies a run for resuming: its settings (the process count among them), the training code and the
    exact training data."""
    identity = [config.__dict__, extra, source_digest(entries=TRAINING_CODE), data_digest]
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def new_method(config: TrainConfig, extra: dict, num_classes: int) -> tuple[torch.nn.Module, str]:
    """The untrained method, initialised from the seed, and the augmentation kind it trains with."""
    torch.manual_seed(config.seed)
    method = build_method(extra["method"], build_backbone(extra["backbone"], width=extra["width"]),
                          num_classes=num_classes, **extra["hparams"])
    return method, method.augmentation if extra["augmentation"] == "auto" else extra["augmentation"]


def victim_augment(kind: str, extra: dict, image_size: int) -> torch.nn.Module:
    return build_augment(kind, image_size, extra["per_batch"], extra["min_scale"])


def save_victim(folder: Path, method: torch.nn.Module, extra: dict, kind: str) -> None:
    """The trained encoder (what every evaluation reads) and the whole method (what the defenses retrain)."""
    meta = {"method": extra["method"], "augmentation": kind, "per_batch": str(extra["per_batch"])}
    save_encoder(folder / "encoder.safetensors", method.encoder, extra["backbone"], extra["width"], **meta)
    save_method(folder / "model.safetensors", method, extra["method"], extra["backbone"], extra["width"],
                extra["hparams"], augmentation=kind, per_batch=extra["per_batch"])


def check_inputs_agree(ranks: distributed.Ranks, data_file: Path = POISON_DIR / "train.safetensors",
                       scores_trigger: bool = True) -> str:
    """Every rank must train on the same set (and score the same trigger, if it does); returns the set's digest."""
    data_digest = file_digest(data_file, "sha256")
    if ranks.distributed:
        distributed.check_same_everywhere(str(data_file), data_digest)
    if ranks.distributed and scores_trigger:
        trigger_digest = "".join(file_digest(TRIGGER_DIR / name, "sha256") for name in (TRIGGER_JSON, TRIGGER_TENSORS))
        distributed.check_same_everywhere(str(TRIGGER_DIR), hashlib.sha256(trigger_digest.encode()).hexdigest())
    return data_digest


@one_line_errors
def pretrain(params_path: Path = PARAMS_OPTION, progress: bool = PROGRESS_OPTION) -> None:
    """Pretrain an encoder on data/poisoned/train; resume from data/pretrain/checkpoints/ if they match.

    Under `torchrun --no-python --nproc_per_node N cba pretrain` it trains on N processes (NCCL on GPUs, gloo
    on CPUs)."""
    params = Params.load(params_path)
    check_outputs(PRETRAIN_DIR, METRICS_DIR, DETAILS_DIR, PLOTS_DIR)
    config, extra = read_config(params)
    run_on_ranks(_pretrain, config, extra, progress)


def run_on_ranks(body: Callable[..., None], config: TrainConfig, extra: dict, progress: bool) -> None:
    """Run a training stage's `body` on this process's rank and device (every rank under torchrun); an error
    inside names the pretrain option it concerns."""
    ranks, device = distributed.start(extra["device"])
    try:
        with (in_section("pretrain.augmentation", ["kind"]),
              in_section("pretrain", ["method", "backbone", "width", "batch_size"])):
            body(config, extra, ranks, device, progress)
    finally:
        distributed.finish()


def _pretrain(config: TrainConfig, extra: dict, ranks: distributed.Ranks, device: torch.device, progress: bool) -> None:
    # Loading the stored sets is quick; it comes first because the head size depends on the classes.
    train_set, clean, test = load_stage_set("train"), load_stage_set("clean_train"), load_stage_set("test")
    check_target(extra["target_class"], train_set)
    check_loss_log(config.epochs, len(train_set))
    manifest = read_manifest(len(train_set))  # checked now: it is used only after training
    method, kind = new_method(config, extra, train_set.num_classes)
    triggered = triggered_test_set(test, load_trigger(TRIGGER_DIR), extra["target_class"], config.seed)
    bank = np.random.default_rng(config.seed).permutation(len(clean))[: extra["eval_bank_size"]]

    def monitor(encoder: torch.nn.Module, epoch: int) -> dict[str, float]:
        return knn_backdoor_metrics(encoder, clean.images[bank], clean.labels[bank], test.images, test.labels,
                                    triggered.images, extra["target_class"], clean.num_classes)

    data_digest = check_inputs_agree(ranks)
    random_init = monitor(method.encoder.to(device), 0) if ranks.is_main else {}
    # The curves score the ASR set, and a checkpoint carries the curves so far: a test-time pattern changed
    # with the poisons kept (trigger.params.test_weight) must not resume the old readings.
    asr_set = hashlib.sha256(triggered.images.tobytes()).hexdigest()
    fingerprint = run_fingerprint(config, {**extra, "processes": ranks.world_size, "asr_set": asr_set}, data_digest)
    result = train(method, train_set.images, train_set.labels, victim_augment(kind, extra, train_set.images.shape[1]),
                   config, device, evaluate=monitor,
                   checkpointer=Checkpointer(PRETRAIN_DIR / "checkpoints", fingerprint), progress=progress)
    seconds = result.seconds  # every epoch's time, those restored from a checkpoint included
    if not ranks.is_main:
        return  # rank 0 writes every artifact

    save_victim(PRETRAIN_DIR, method, extra, kind)
    write_parquet(PRETRAIN_DIR / "losses.parquet", result.loss_frame(manifest["poisoned"].to_numpy()))
    curves = pd.DataFrame(result.curves)
    write_csv(PLOTS_DIR / "pretrain_loss.csv", curves[["epoch", "loss", "lr"]])
    knn_rows = (curves.dropna(subset=["knn_acc"])[["epoch", "knn_acc", "knn_asr"]] if "knn_acc" in curves
                else curves[["epoch"]])
    write_csv(PLOTS_DIR / "pretrain_knn.csv", knn_rows)
    last = result.curves[-1]
    write_metrics("pretrain", {
        "final_loss": last["loss"], "knn_acc": last.get("knn_acc"), "knn_asr": last.get("knn_asr"),
        "random_init_knn_acc": random_init["knn_acc"], "random_init_knn_asr": random_init["knn_asr"],
        "epochs": config.epochs, "seconds": seconds, "resumed_epochs": result.resumed_epochs,
        "method": extra["method"], "backbone": extra["backbone"], "width": extra["width"], "augmentation": kind,
        "augmentation_protocol": "per_batch" if extra["per_batch"] else "per_sample",
        "env": {**environment(device), "processes": ranks.world_size},
    })
    nan = float("nan")
    print(f"pretrain {extra['method']}: kNN ACC {last.get('knn_acc', nan):.3f}, ASR {last.get('knn_asr', nan):.3f} "
          f"(random init ACC {random_init['knn_acc']:.3f}) in {seconds:.0f}s")

