"""Read a finished pipeline's encoders (a repository after `dvc repro finetune`) on triggers of one's choosing.

The benches that ask what a victim reads of a pattern other than its own (another seed's, a changed copy)
read the encoders the pipeline saved, the way `cba finetune` reads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cba.attack import reader_options
from cba.data.io import load_imageset
from cba.evaluate import read_triggered_sets
from cba.models.io import load_encoder
from cba.poison import triggered_test_set
from cba.triggers import Trigger


def read_pipeline_triggers(root: Path, params: dict[str, Any], triggers: list[Trigger],
                           encoders: dict[str, str]) -> dict[str, list[dict[str, dict]]]:
    """Each encoder (name -> file under `root`) reading each trigger on the pipeline's test set, with the
    pipeline's kNN and converged probe on its clean labelled set (`params`: the root's params.yaml). Every
    triggered set is built once for all encoders; each encoder's clean features and probe once for all sets.
    Returns, per encoder, `cba.evaluate.evaluate_features`'s metrics per trigger."""
    seed, target = int(params.get("seed", 0)), int(params.get("target_class", 0))
    clean, test = (load_imageset(root / f"data/poisoned/{name}.safetensors") for name in ("clean_train", "test"))
    triggered = [triggered_test_set(test, trigger, target, seed).images for trigger in triggers]
    return {name: read_triggered_sets(load_encoder(root / path), clean.images, clean.labels, test.images,
                                      test.labels, triggered, target, clean.num_classes, **reader_options(params))
            for name, path in encoders.items()}
