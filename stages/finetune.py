"""`cba finetune`: kNN and linear-probe evaluation of the pretrained encoder."""

from __future__ import annotations

from pathlib import Path

import torch

from cba.env import environment
from cba.analysis.readout import trigger_readout
from cba.data.base import ImageSet
from cba.evaluate import LinearProbe, evaluate_encoder, extract_features
from cba.io import save_tensors, write_json
from cba.models.io import encoder_metadata, load_encoder
from cba.poison import triggered_test_set
from cba.ssl.io import load_method
from cba.defenses.base import Classifier, classifier_acc_asr
from cba.triggers import load_trigger
from stages.common import (FINETUNE_DIR, MANIFEST_COLUMNS, METRICS_DIR, PARAMS_OPTION, POISON_DIR, PRETRAIN_DIR,
                           TRIGGER_DIR, check_outputs, check_target, load_stage_set, one_line_errors, read_table)
from stages.params import Params


def read_config(params: Params) -> dict:
    params.section("finetune", ["knn", "linear"])
    params.section("finetune.knn", ["k", "temperature"])
    params.section("finetune.linear", ["epochs", "lr", "weight_decay"])
    return {
        "k": params.integer("finetune.knn.k", 200, low=1),
        "temperature": params.number("finetune.knn.temperature", 0.1, low=0.0, open_low=True),
        "probe_epochs": params.integer("finetune.linear.epochs", 50, low=1),
        "probe_lr": params.number("finetune.linear.lr", 0.1, low=0.0, open_low=True),
        "probe_weight_decay": params.number("finetune.linear.weight_decay", 1e-4, low=0.0),
        "seed": params.integer("seed", 0, low=0, high=2**32 - 1),
    }


def readout(encoder: torch.nn.Module, probe: LinearProbe, test: ImageSet, triggered: ImageSet, target: int) -> dict:
    """How the probe reads the trigger feature (`cba.analysis.readout`); empty without poisons."""
    manifest = read_table(POISON_DIR / "manifest.parquet", MANIFEST_COLUMNS)
    poisoned = manifest["poisoned"].to_numpy(dtype=bool)
    clean_target = ~poisoned & (manifest["original_label"].to_numpy() == target)
    if not poisoned.any() or not clean_target.any():
        return {}
    train = load_stage_set("train")
    keep = test.labels != target  # the images `triggered` holds, in the same order
    return trigger_readout(probe, extract_features(encoder, test.images[keep]), extract_features(encoder, triggered.images),
                           extract_features(encoder, train.images[poisoned]), extract_features(encoder, train.images[clean_target]),
                           target, list(test.classes))


@one_line_errors
def finetune(params_path: Path = PARAMS_OPTION) -> None:
    """Fit kNN and a linear probe on clean labelled data; write metrics/finetune.json (acc, asr)."""
    params = Params.load(params_path)
    check_outputs(FINETUNE_DIR, METRICS_DIR)
    config = read_config(params)
    target = params.integer("target_class", low=0)
    encoder = load_encoder(PRETRAIN_DIR / "encoder.safetensors")
    clean, test = load_stage_set("clean_train"), load_stage_set("test")
    check_target(target, clean)
    triggered = triggered_test_set(test, load_trigger(TRIGGER_DIR), target, config["seed"])
    metrics, probe = evaluate_encoder(encoder, clean.images, clean.labels, test.images, test.labels, triggered.images,
                                      target, clean.num_classes, **config)
    save_tensors(FINETUNE_DIR / "probe.safetensors", probe.state_dict())
    metrics["readout"] = readout(encoder, probe, test, triggered, target)
    meta = encoder_metadata(PRETRAIN_DIR / "encoder.safetensors")
    # Top-level acc/asr are those of the downstream classifier the defenses attack:
    # the linear probe for SSL, the model's own (poisoned-label) head for the supervised attack.
    primary = "linear"
    method, _ = load_method(PRETRAIN_DIR / "model.safetensors")
    if getattr(method, "uses_labels", False) and hasattr(method, "head"):
        metrics["head"] = classifier_acc_asr(Classifier(method.encoder, method.head), test, triggered, target)
        primary = "head"
    write_json(METRICS_DIR / "finetune.json", {
        "acc": metrics[primary]["acc"], "asr": metrics[primary]["asr"], "primary": primary, **metrics,
        "method": meta.get("method"), "augmentation_protocol": "per_batch" if meta.get("per_batch") == "True" else "per_sample",
        "env": environment("cpu"),
    })
    print(f"finetune: linear ACC {metrics['linear']['acc']:.3f} ASR {metrics['linear']['asr']:.3f} | "
          f"kNN ACC {metrics['knn']['acc']:.3f} ASR {metrics['knn']['asr']:.3f}")
