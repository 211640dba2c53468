"""Read a finished pipeline's encoders (a repository after `dvc repro finetune`) on triggers of one's choosing.

The benches that ask what a victim reads of a pattern other than its own (another seed's, a changed copy)
read the encoders the pipeline saved, the way `cba finetune` reads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import yaml

from cba.attack import reader_options
from cba.data.base import ImageSet
from cba.data.io import load_imageset
from cba.evaluate import read_triggered_sets
from cba.models.io import load_encoder
from cba.poison import triggered_test_set
from cba.triggers import Trigger

ENCODERS = {"poisoned": "data/pretrain/encoder.safetensors", "reference": "data/reference/encoder.safetensors"}
READERS = ("linear", "knn")


def pipeline_files(encoders: Iterable[str] = ENCODERS.values()) -> tuple[str, ...]:
    """What `read_pipeline_triggers` reads of a root, with these encoders."""
    return ("params.yaml", "data/trigger", *encoders, "data/poisoned/clean_train.safetensors",
            "data/poisoned/test.safetensors")


def pipeline_params(root: Path) -> dict[str, Any]:
    """The params.yaml a finished pipeline ran with (an empty file: every default)."""
    return yaml.safe_load((root / "params.yaml").read_text()) or {}


def pipeline_sets(root: Path) -> tuple[ImageSet, ImageSet]:
    """The pipeline's clean labelled training set and its test set, as `cba poison` wrote them."""
    clean, test = (load_imageset(root / f"data/poisoned/{name}.safetensors") for name in ("clean_train", "test"))
    return clean, test


def scaled_pattern(trigger: Trigger, scale: float) -> Trigger:
    """The same additive pattern times `scale` (L-inf `scale` x linf on the 0-255 scale), in a trigger of the
    same kind: the pipeline's trigger at another amplitude. Refuses, in one line, a trigger that is not an
    additive pattern and a scale that leaves the 0-255 range."""
    from cba.triggers.optimized import OptimizedTrigger

    if "pattern" not in trigger.tensors():
        raise SystemExit(f"trigger {trigger.name!r}: not an additive pattern; only `optimized` patterns can be scaled")
    linf = float(trigger.params["linf"]) * scale
    if not 0 < linf <= 255:
        raise SystemExit(f"scale {scale:g}: the pattern's L-inf would be {linf:g}; allowed a scale above 0 and up to "
                         f"{255 / float(trigger.params['linf']):g}")
    return OptimizedTrigger.from_pattern(trigger.tensors()["pattern"].numpy() * scale, linf, seed=trigger.seed)


def unfinished(roots: Iterable[Path], needed: Iterable[str]) -> str | None:
    """The refusal for the first root that lacks one of the `needed` files, or None when none does."""
    needed = tuple(needed)
    for root in roots:
        missing = [path for path in needed if not (root / path).exists()]
        if missing:
            return f"--root {root}: no {missing[0]}; run `dvc repro finetune` there first"
    return None


def asr_by_trigger(readings: dict[str, list[dict[str, dict]]]) -> list[dict[str, dict[str, float]]]:
    """`read_pipeline_triggers`'s readings as one {encoder: {reader: ASR}} per trigger."""
    count = len(next(iter(readings.values())))
    return [{name: {reader: sets[i][reader]["asr"] for reader in READERS} for name, sets in readings.items()}
            for i in range(count)]


def victim_cells(poisoned: dict[str, float], reference: dict[str, float], ratio_digits: int) -> str:
    """Three table cells: the poisoned victim's linear / kNN ASR, the reference's, and their ratios."""
    ratio = " / ".join(f"{poisoned[n] / max(reference[n], 1e-3):.{ratio_digits}f}x" for n in READERS)
    return (f"{poisoned['linear']:.3f} / {poisoned['knn']:.3f} | {reference['linear']:.3f} / {reference['knn']:.3f} "
            f"| {ratio}")


def read_pipeline_images(root: Path, params: dict[str, Any], image_sets: list[np.ndarray], encoders: dict[str, str],
                         sets: tuple[ImageSet, ImageSet] | None = None) -> dict[str, list[dict[str, dict]]]:
    """Each encoder (name -> file under `root`) reading each set of (already stamped) test images, with the
    pipeline's kNN and converged probe on its clean labelled set (`params`: the root's params.yaml); each
    encoder's clean features and probe are computed once for all sets. Returns, per encoder,
    `cba.evaluate.evaluate_features`'s metrics per set. `sets`: the pipeline's clean labelled and test sets, where
    the caller has loaded them already."""
    target = int(params.get("target_class", 0))
    clean, test = sets or pipeline_sets(root)
    return {name: read_triggered_sets(load_encoder(root / path), clean.images, clean.labels, test.images,
                                      test.labels, image_sets, target, clean.num_classes, **reader_options(params))
            for name, path in encoders.items()}


def read_pipeline_triggers(root: Path, params: dict[str, Any], triggers: list[Trigger],
                           encoders: dict[str, str]) -> dict[str, list[dict[str, dict]]]:
    """Each encoder (name -> file under `root`) reading each trigger on the pipeline's ASR set (every non-target
    test image, the trigger stamped as the attack stamps it): `read_pipeline_images` of those sets, each built
    once for all encoders."""
    seed, target = int(params.get("seed", 0)), int(params.get("target_class", 0))
    clean, test = pipeline_sets(root)
    triggered = [triggered_test_set(test, trigger, target, seed).images for trigger in triggers]
    return read_pipeline_images(root, params, triggered, encoders, sets=(clean, test))
