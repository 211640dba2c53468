"""`cba finetune`: kNN and linear-probe evaluation of the pretrained encoder, and of the reference victim's."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cba.env import environment
from cba.analysis.readout import trigger_readout
from cba.data.base import ImageSet
from cba.errors import in_section
from cba.evaluate import KNN_K, KNN_TEMPERATURE, evaluate_encoder, extract_features
from cba.probe import MAX_ITER, VAL_FRACTION, WEIGHT_DECAYS, LinearProbe, check_probe_options, save_probe
from cba.models.io import encoder_metadata, load_encoder
from cba.poison import triggered_test_set
from cba.ssl.io import load_method
from cba.record import Classifier, classifier_acc_asr, own_head
from cba.triggers import load_trigger
from stages.common import (DETAILS_DIR, FINETUNE_DIR, METRICS_DIR, PARAMS_OPTION, PRETRAIN_DIR, REFERENCE_DIR,
                           TRIGGER_DIR, check_outputs, check_target, load_stage_set, one_line_errors, write_metrics,
                           read_manifest)
from stages.params import Params

if TYPE_CHECKING:
    import pandas as pd


def read_config(params: Params) -> dict:
    params.section("finetune", ["knn", "linear"])
    params.section("finetune.knn", ["k", "temperature"])
    linear = params.section("finetune.linear", ["weight_decays", "val_fraction", "max_iter"])
    options = {"weight_decays": linear.get("weight_decays", list(WEIGHT_DECAYS)),
               "val_fraction": linear.get("val_fraction", VAL_FRACTION), "max_iter": linear.get("max_iter", MAX_ITER)}
    with in_section("finetune.linear", options):
        check_probe_options(**options)
    return {
        "k": params.integer("finetune.knn.k", KNN_K, low=1),
        "temperature": params.number("finetune.knn.temperature", KNN_TEMPERATURE, low=0.0, open_low=True),
        "probe_options": options,
        "seed": params.integer("seed", 0, low=0, high=2**32 - 1),
    }


def readout(encoder: torch.nn.Module, probe: LinearProbe, test: ImageSet, triggered: ImageSet, target: int,
            manifest: "pd.DataFrame") -> dict:
    """How the probe reads the trigger feature (`cba.analysis.readout`); empty without poisons."""
    poisoned = manifest["poisoned"].to_numpy(dtype=bool)
    clean_target = ~poisoned & (manifest["original_label"].to_numpy() == target)
    if not poisoned.any() or not clean_target.any():
        return {}
    train = load_stage_set("train")
    keep = test.labels != target  # the images `triggered` holds, in the same order
    features = (extract_features(encoder, images) for images in
                (test.images[keep], triggered.images, train.images[poisoned], train.images[clean_target]))
    return trigger_readout(probe, *features, target, list(test.classes))


@one_line_errors
def finetune(params_path: Path = PARAMS_OPTION) -> None:
    """Fit kNN and a linear probe on clean labelled data; write metrics/finetune.json (acc, asr).

    The same reading of the same trigger on the reference victim (data/reference, `cba reference`) goes under
    `reference`: the ASR the trigger reaches without any poison, which a backdoor must exceed."""
    params = Params.load(params_path)
    check_outputs(FINETUNE_DIR, METRICS_DIR, DETAILS_DIR)
    config = read_config(params)
    target = params.integer("target_class", low=0)
    encoder = load_encoder(PRETRAIN_DIR / "encoder.safetensors")
    clean, test = load_stage_set("clean_train"), load_stage_set("test")
    check_target(target, clean)
    manifest = read_manifest(len(clean))
    # Every input is read and checked before the first output is written.
    method, _ = load_method(PRETRAIN_DIR / "model.safetensors")
    triggered = triggered_test_set(test, load_trigger(TRIGGER_DIR), target, config["seed"])
    reference_encoder = load_encoder(REFERENCE_DIR / "encoder.safetensors")
    reference_method, _ = load_method(REFERENCE_DIR / "model.safetensors")
    metrics, fit = evaluate_encoder(encoder, clean.images, clean.labels, test.images, test.labels, triggered.images,
                                    target, clean.num_classes, triggered_labels=triggered.labels, **config)
    # The same reading of the same trigger on the reference victim (`cba reference`: no poisons).
    reference, _ = evaluate_encoder(reference_encoder, clean.images, clean.labels, test.images, test.labels,
                                    triggered.images, target, clean.num_classes, triggered_labels=triggered.labels,
                                    **config)
    save_probe(FINETUNE_DIR / "probe.safetensors", fit.probe)
    metrics["linear"]["probe"] = fit.summary()
    metrics["readout"] = readout(encoder, fit.probe, test, triggered, target, manifest)
    meta = encoder_metadata(PRETRAIN_DIR / "encoder.safetensors")
    # Top-level acc/asr are those of the downstream classifier the defenses attack:
    # the linear probe for SSL, the model's own (poisoned-label) head for the supervised attack.
    primary = "linear"
    if own_head(method) is not None:
        metrics["head"] = classifier_acc_asr(Classifier(method.encoder, own_head(method)), test, triggered, target)
        primary = "head"
    if own_head(reference_method) is not None:
        reference["head"] = classifier_acc_asr(Classifier(reference_method.encoder, own_head(reference_method)), test,
                                               triggered, target)
    metrics["reference"] = reference
    write_metrics("finetune", {
        "acc": metrics[primary]["acc"], "asr": metrics[primary]["asr"], "primary": primary, **metrics,
        "method": meta.get("method"),
        "augmentation_protocol": "per_batch" if meta.get("per_batch") == "True" else "per_sample",
        "env": environment("cpu"),
    })
    line = " | ".join(f"{label} ACC {metrics[name]['acc']:.3f} ASR {metrics[name]['asr']:.3f} (natural "
                      f"{metrics[name]['natural_rate']:.3f}, RA {metrics[name]['robust_acc']:.3f})"
                      for name, label in (("linear", "linear"), ("knn", "kNN")))
    print(f"finetune: {line}; probe weight decay {fit.weight_decay:g}")
    print("reference victim (no poisons), same trigger: " + " | ".join(
        f"{label} ACC {reference[name]['acc']:.3f} ASR {reference[name]['asr']:.3f}"
        for name, label in (("linear", "linear"), ("knn", "kNN"))))
