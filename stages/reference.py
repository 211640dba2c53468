"""`cba reference`: the reference victim, pretrained exactly as `cba pretrain` pretrains but without poisons.

A backdoor is what poisoning adds. A pattern that an encoder trained without a single poison already reads as
the target is an adversarial pattern, and the victim reads it too. So every run measures its ASR against the
ASR that the same trigger reaches on this encoder (`cba finetune` reads both; `cba.verdicts` asks for 3x).

The stage trains pretrain's recipe (settings, seed, code) on data/poisoned/clean_train. It depends on neither
the trigger, the poison rate nor the target class, so DVC reruns it only when the data, the seed or the
pretraining settings change: a trigger or poison experiment costs one more reading, not one more training.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cba import distributed
from cba.env import environment
from cba.train import Checkpointer, TrainConfig, train
from stages.common import (DETAILS_DIR, METRICS_DIR, PARAMS_OPTION, POISON_DIR, PROGRESS_OPTION, REFERENCE_DIR,
                           check_outputs, load_stage_set, one_line_errors, write_metrics)
from stages.params import Params
from stages.pretrain import (check_inputs_agree, check_loss_log, new_method, read_config, run_fingerprint, run_on_ranks,
                             save_victim, victim_augment)


@one_line_errors
def reference(params_path: Path = PARAMS_OPTION, progress: bool = PROGRESS_OPTION) -> None:
    """Pretrain the reference victim on data/poisoned/clean_train (no poisons); resume from data/reference/checkpoints/."""
    params = Params.load(params_path)
    check_outputs(REFERENCE_DIR, METRICS_DIR, DETAILS_DIR)
    config, extra = read_config(params)
    extra.pop("target_class")  # read and checked with the rest, but the reference never sees a trigger
    run_on_ranks(_reference, config, extra, progress)


def _reference(config: TrainConfig, extra: dict, ranks: distributed.Ranks, device: torch.device, progress: bool) -> None:
    clean = load_stage_set("clean_train")
    check_loss_log(config.epochs, len(clean))
    method, kind = new_method(config, extra, clean.num_classes)
    data_digest = check_inputs_agree(ranks, POISON_DIR / "clean_train.safetensors", scores_trigger=False)
    fingerprint = run_fingerprint(config, {**extra, "processes": ranks.world_size, "reference": True}, data_digest)
    # No evaluation hook: the pretrain stage's kNN curve scores the trigger, which this stage must not depend on.
    # The hook reads the encoder in eval mode only, so the weights are the ones `cba pretrain` would train here.
    result = train(method, clean.images, clean.labels, victim_augment(kind, extra, clean.images.shape[1]), config, device,
                   checkpointer=Checkpointer(REFERENCE_DIR / "checkpoints", fingerprint), progress=progress)
    if not ranks.is_main:
        return
    save_victim(REFERENCE_DIR, method, extra, kind)
    last = result.curves[-1]
    write_metrics("reference", {
        "final_loss": last["loss"], "epochs": config.epochs, "seconds": result.seconds, "resumed_epochs": result.resumed_epochs,
        "method": extra["method"], "backbone": extra["backbone"], "width": extra["width"], "augmentation": kind,
        "env": {**environment(device), "processes": ranks.world_size},
    })
    print(f"reference {extra['method']} without poisons: final loss {last['loss']:.3f} in {result.seconds:.0f}s")
