"""Run a whole attack in-process: poison, pretrain, fit the downstream head.

The DVC pipeline does the same through files; this is for tests and benches
that need an `AttackRecord` without a pipeline around it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cba.augment import build_augment
from cba.data import load_dataset
from cba.data.base import ImageSet
from cba.evaluate import KNN_K, KNN_TEMPERATURE, knn_backdoor_metrics
from cba.models import build_backbone
from cba.params_file import params_from_args
from cba.poison import poison_dataset, triggered_test_set
from cba.record import AttackRecord, build_record, classifier_acc_asr
from cba.ssl import build_method
from cba.train import TrainConfig, train
from cba.triggers import Trigger
from cba.victim_cache import load_victim, matches_stored, save_victim, victim_key


def params_splits(params: dict[str, Any], **options: Any) -> tuple[ImageSet, ImageSet]:
    """The training and test sets a params.yaml dict's `data` section names, generated or read from `seed`.

    `options` (None values ignored) override its `data.options`, e.g. `train_size`."""
    data = params.get("data") or {}
    seed = int(params.get("seed", 0))
    chosen = {**(data.get("options") or {}), **{k: v for k, v in options.items() if v is not None}}
    return tuple(load_dataset(data.get("name", "synthetic"), split, root=data.get("root"), seed=seed,  # type: ignore[return-value]
                              **chosen) for split in ("train", "test"))


def pipeline_defaults(params: dict[str, Any]) -> dict[str, Any]:
    """The attack and victim settings a params.yaml dict gives the pipeline, under the names benches use for them."""
    options = (params.get("data") or {}).get("options") or {}
    victim = victim_settings(params)
    return {"train_size": options.get("train_size"), "test_size": options.get("test_size"),
            "poison_rate": float(params.get("poison_rate", 0.05)),
            **{k: victim[k] for k in ("epochs", "width", "batch_size", "min_scale", "per_batch", "seed", "target_class")}}


def read_pipeline_args(parser: Any, args: Any) -> None:
    """A bench's `--params` file read into `args.pipeline`, and its flags left at None filled from it.

    Bad input stops through `parser.error`, in one line, before any training: a missing file, a bad `--set`, a
    poison rate outside [0, 1]."""
    args.pipeline = params_from_args(args, parser)
    fill_pipeline_defaults(args, args.pipeline)
    if not 0 <= args.poison_rate <= 1:
        parser.error(f"--poison-rate {args.poison_rate}: outside [0, 1]")


def fill_pipeline_defaults(args: Any, params: dict[str, Any]) -> None:
    """Set every attribute of `args` that the user left at None to the pipeline's value from `params`.

    Benches run the pipeline's attack unless told otherwise; a flag given on
    the command line wins."""
    for key, value in pipeline_defaults(params).items():
        if getattr(args, key, "absent") is None:
            setattr(args, key, value)


def victim_settings(params: dict[str, Any], method: str | None = None) -> dict[str, Any]:
    """`run_attack` keywords for the victim `cba pretrain` would train from a params.yaml dict.

    Benches call this so that their victims match the pipeline's; `method`
    overrides `pretrain.method` (and picks that method's own section)."""
    pretrain = params.get("pretrain") or {}
    augmentation = pretrain.get("augmentation") or {}
    method = method or pretrain.get("method", "simclr")
    lr = pretrain.get("lr", "auto")
    return {
        "method": method, "backbone": pretrain.get("backbone", "convnet"), "width": int(pretrain.get("width", 16)),
        "epochs": int(pretrain.get("epochs", 20)), "batch_size": int(pretrain.get("batch_size", 256)),
        "lr": None if lr == "auto" else float(lr), "weight_decay": float(pretrain.get("weight_decay", 5e-4)),
        "momentum": float(pretrain.get("momentum", 0.9)), "warmup_epochs": int(pretrain.get("warmup_epochs", 2)),
        "hparams": dict(pretrain.get(method) or {}), "per_batch": bool(augmentation.get("per_batch", False)),
        "min_scale": float(augmentation.get("min_scale", 0.5)), "seed": int(params.get("seed", 0)),
        "target_class": int(params.get("target_class", 0)),
    }


def reader_options(params: dict[str, Any]) -> dict[str, Any]:
    """`cba.evaluate.evaluate_features` keywords for the kNN and the linear probe a params.yaml dict gives
    `cba finetune`, so that a bench reads an encoder exactly as the pipeline does."""
    finetune = params.get("finetune") or {}
    knn, linear = finetune.get("knn") or {}, finetune.get("linear") or {}
    return {"k": int(knn.get("k", KNN_K)), "temperature": float(knn.get("temperature", KNN_TEMPERATURE)),
            "seed": int(params.get("seed", 0)),
            "probe_options": {key: linear[key] for key in ("weight_decays", "val_fraction", "max_iter") if key in linear}}


def initial_backbone(backbone: str, width: int, seed: int) -> torch.nn.Module:
    """The encoder a victim starts from, as `cba pretrain` builds it: torch seeded with `seed`, the backbone built
    before any head, so the heads' draws come after and never change it."""
    torch.manual_seed(seed)
    return build_backbone(backbone, width=width)


def run_attack(
    train_set: ImageSet, test: ImageSet, trigger: Trigger, *, method: str = "supervised", mode: str = "dirty_label",
    poison_rate: float = 0.05, target_class: int = 0, backbone: str = "convnet", width: int = 16, epochs: int = 10,
    batch_size: int = 256, lr: float | None = None, weight_decay: float = 5e-4, momentum: float = 0.9,
    warmup_epochs: int | None = None, seed: int = 0,
    hparams: dict[str, Any] | None = None, per_batch: bool = False, min_scale: float = 0.5,
    device: torch.device | None = None, progress: bool = False, eval_every: int | None = None,
    evaluate: Callable[[torch.nn.Module, int], dict[str, float]] | None = None, cache: str | Path | None = None,
) -> AttackRecord:
    """Poison `train_set`, train `method` on it, and fit the downstream classifier.

    `evaluate(encoder, epoch)` runs every `eval_every` epochs (default: only the
    last); its rows land in `record.curves`. `cache`: a folder of trained
    victims (`cba.victim_cache`); a victim trained before with the same
    settings, data, trigger and code is loaded instead of trained. It is not
    used with `evaluate`, whose side effects a loaded victim would skip. `warmup_epochs`: None for
    min(2, epochs // 4), the trigger stage's surrogate rule; `victim_settings` passes the pipeline's."""
    device = device or torch.device("cpu")
    poisoned = poison_dataset(train_set, trigger, poison_rate, target_class, mode, seed)
    mask = np.zeros(len(train_set), dtype=bool)
    mask[poisoned.indices] = True

    def new_model() -> torch.nn.Module:
        return build_method(method, initial_backbone(backbone, width, seed), num_classes=train_set.num_classes,
                            **(hparams or {}))

    def record_of(model: torch.nn.Module, losses: Any, curves: list, seconds: float | None) -> AttackRecord:
        return build_record(model, method=method, backbone=backbone, width=width, hparams=dict(hparams or {}),
                            train=poisoned.train, clean_train=train_set, test=test, trigger=trigger, poisoned=mask,
                            target_class=target_class, seed=seed, losses=losses, curves=curves, train_seconds=seconds)

    warmup = min(2, epochs // 4) if warmup_epochs is None else warmup_epochs
    entry = None
    if cache is not None and evaluate is None:
        settings = {"method": method, "mode": mode, "poison_rate": poison_rate, "target_class": target_class,
                    "backbone": backbone, "width": width, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                    "weight_decay": weight_decay, "momentum": momentum, "warmup_epochs": warmup, "seed": seed,
                    "hparams": hparams or {}, "per_batch": per_batch, "min_scale": min_scale}
        entry = Path(cache) / victim_key(settings, train_set, test, trigger, device)
        model = new_model()
        stored = load_victim(entry, model)
        if stored is not None:
            # The layout training leaves a model in (`cba.train`): CPU kernels round differently in each, so a
            # loaded victim would otherwise read its images a few bits off the fresh one.
            model.to(memory_format=torch.channels_last)
            record = record_of(model, stored["losses"], stored["curves"], stored["train_seconds"])
            if matches_stored(settings, record.baseline, stored["baseline"]):
                return record
    model = new_model()  # fresh weights: a rejected cache entry may have been loaded into the last one
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr if lr is not None else model.default_lr,
                         momentum=momentum, weight_decay=weight_decay, warmup_epochs=warmup, seed=seed,
                         eval_every=eval_every or epochs)
    result = train(model, poisoned.train.images, poisoned.train.labels,
                   build_augment(model.augmentation, train_set.images.shape[1], per_batch, min_scale), config, device,
                   evaluate=evaluate, progress=progress)
    record = record_of(model, result.loss_frame(mask), result.curves, result.seconds)
    if entry is not None:
        save_victim(entry, record.model, record.losses, record.curves, record.train_seconds, record.baseline)
    return record


def trigger_scores(record: AttackRecord, trigger: Trigger, bank_size: int = 5000) -> dict[str, float]:
    """ACC and ASR of `trigger` on the victim in `record`, by its downstream classifier and by kNN on clean labels.

    The trigger need not be the one the victim was poisoned with: on a victim
    trained without poisons this gives the ASR a pattern reaches on its own."""
    triggered = triggered_test_set(record.test, trigger, record.target_class, record.seed)
    probe = classifier_acc_asr(record.classifier, record.test, triggered, record.target_class)
    bank = np.random.default_rng(record.seed).permutation(len(record.clean_train))[:bank_size]
    knn = knn_backdoor_metrics(record.encoder, record.clean_train.images[bank], record.clean_train.labels[bank],
                               record.test.images, record.test.labels, triggered.images, record.target_class,
                               record.clean_train.num_classes)
    return {"probe_acc": probe["acc"], "probe_asr": probe["asr"], **knn}
