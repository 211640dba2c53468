"""Fine-tuning on another downstream data set (the paper's last defense).

Algorithm. A victim who fine-tunes the whole pretrained encoder on their own
labelled task might hope to wash the backdoor out. Here the encoder (a copy)
is fine-tuned end to end with a linear head and weak augmentation on a
*different* data set (`dataset`, default the built-in texture set). The head
starts from the downstream linear probe (`head_init: probe`, LP-FT, Kumar et
al. 2022): a random head's early gradients distort the features, and on our
small defaults it ends below the frozen probe. We report:

- on that downstream task, before (frozen encoder + linear probe) and after
  fine-tuning: clean ACC, ACC on triggered inputs, and the "effective" ASR:
  the downstream classes differ from the pretraining ones, so there is no
  target class; a backdoor shows as triggered inputs piling into one class.
  `downstream_asr` is the largest fraction, over classes c, of triggered images
  whose true class is not c that are predicted as c, and `downstream_target` is c.
- on the original task: ACC/ASR of a linear probe refitted on clean labelled
  data, on the pretrained encoder (before) and the fine-tuned one (after).

Reference: Li et al., USENIX Security 2024, Sec. on downstream defenses.
SSL adaptation: none needed; it is the transfer-learning use of an SSL encoder.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cba.augment import build_augment
from cba.data import DATASETS, ImageSet, load_dataset
from cba.defenses.base import AttackRecord, Classifier, Defense, check, predict, repair_metrics
from cba.defenses.registry import DEFENSES
from cba.errors import DEVICE_CHOICES, is_int, is_number, is_device
from cba.evaluate import LinearProbe, accuracy, evaluate_encoder, extract_features, fit_linear_probe, pick_device
from cba.fit import fit
from cba.train import epoch_batches

HEAD_INITS = ("probe", "random")


def record_probe(record: AttackRecord) -> LinearProbe | None:
    """The attack's own linear probe (fitted by `cba finetune` on the record's encoder), if its classifier has one."""
    head = getattr(record.classifier, "head", None)
    return head if isinstance(head, LinearProbe) else None


def probe_acc_asr(encoder: nn.Module, record: AttackRecord, probe: LinearProbe | None = None) -> dict[str, float]:
    """Original-task ACC/ASR of an encoder with the converged linear probe refitted on clean labels (kNN as extra
    keys); `probe`, when the encoder is the record's own, is the record's probe and saves refitting it."""
    metrics, _ = evaluate_encoder(encoder, record.clean_train.images, record.clean_train.labels, record.test.images,
                                  record.test.labels, record.triggered.images, record.target_class, record.num_classes,
                                  triggered_labels=record.triggered.labels, seed=record.seed, probe=probe)
    linear = {key: value for key, value in metrics["linear"].items() if key != "landing"}
    return {**linear, "knn_acc": metrics["knn"]["acc"], "knn_asr": metrics["knn"]["asr"]}


def effective_asr(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[float, int]:
    """(largest fraction of triggered inputs not of class c predicted as c, that class c)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    rates = [float((preds[labels != c] == c).mean()) if (labels != c).any() else 0.0 for c in range(num_classes)]
    best = int(np.argmax(rates))
    return rates[best], best


def downstream_metrics(model: nn.Module, test: ImageSet, triggered: np.ndarray) -> dict[str, Any]:
    trig_preds = predict(model, triggered).numpy()
    asr, target = effective_asr(trig_preds, test.labels, test.num_classes)
    return {"acc": accuracy(predict(model, test.images), test.labels),
            "acc_triggered": accuracy(torch.as_tensor(trig_preds), test.labels), "asr": asr, "target": target}


@DEFENSES.register("downstream_ft")
class DownstreamFineTune(Defense):
    kind = "repair"

    def __init__(self, *, dataset: str = "synthetic_textures", train_size: int = 2000, test_size: int = 500,
                 epochs: int = 5, lr: float = 0.01, batch_size: int = 128, weight_decay: float = 5e-4,
                 head_init: str = "probe", device: str = "cpu"):
        check(dataset in DATASETS, "dataset", dataset, f"choose one of {', '.join(DATASETS.names())}")
        for name, value in (("train_size", train_size), ("test_size", test_size), ("epochs", epochs),
                            ("batch_size", batch_size)):
            check(is_int(value) and value >= 1, name, value,
                  "a positive integer")
        for name, value in (("lr", lr), ("weight_decay", weight_decay)):
            check(is_number(value) and value >= 0, name, value,
                  "a non-negative number")
        check(head_init in HEAD_INITS, "head_init", head_init, f"choose one of {', '.join(HEAD_INITS)}")
        check(is_device(device), "device", device, DEVICE_CHOICES)
        self.dataset, self.train_size, self.test_size = dataset, train_size, test_size
        self.epochs, self.lr, self.batch_size, self.weight_decay = epochs, lr, batch_size, weight_decay
        self.head_init, self.device = head_init, device

    def load(self, record: AttackRecord) -> tuple[ImageSet, ImageSet]:
        """The downstream splits, generated from the record's seed at the record's image size."""
        options: dict[str, Any] = {"train_size": self.train_size, "test_size": self.test_size}
        if "image_size" in inspect.signature(DATASETS.get(self.dataset)).parameters:
            options["image_size"] = int(record.test.images.shape[1])
        return tuple(load_dataset(self.dataset, split, root=None, seed=record.seed, **options) for split in ("train", "test"))

    def finetune(self, encoder: nn.Module, head: nn.Module, data: ImageSet, seed: int, progress: bool = False) -> nn.Module:
        """End-to-end SGD (momentum, cosine schedule) of encoder + head; returns the classifier."""
        device = pick_device(self.device)
        torch.manual_seed(seed)
        model = Classifier(encoder, head).to(device)
        model.to(memory_format=torch.channels_last).train()
        augment = build_augment("weak", data.images.shape[1]).to(device)
        images = torch.as_tensor(data.images).permute(0, 3, 1, 2).contiguous().to(device)
        labels = torch.as_tensor(data.labels).long().to(device)
        gen = torch.Generator().manual_seed(seed)

        def loss(idx: torch.Tensor) -> torch.Tensor:
            idx = idx.to(device)
            x = augment(images[idx].float().div_(255)).contiguous(memory_format=torch.channels_last)
            return F.cross_entropy(model(x), labels[idx])

        fit(model.parameters(), lambda _: epoch_batches(len(data), self.batch_size, gen), loss, epochs=self.epochs,
            lr=self.lr, weight_decay=self.weight_decay, desc="downstream fine-tune", progress=progress)
        return model.to("cpu").eval()

    def run(self, record: AttackRecord, progress: bool = False) -> dict[str, Any]:
        train, test = self.load(record)
        triggered = record.trigger.at_test_time().apply(test.images, rng=np.random.default_rng([record.seed, 0xD0F7]))
        frozen = record.encoder
        torch.manual_seed(record.seed)  # a random head's initialisation
        probe = fit_linear_probe(extract_features(frozen, train.images), torch.as_tensor(train.labels),
                                 train.num_classes, seed=record.seed).probe
        down_before = downstream_metrics(Classifier(frozen, probe), test, triggered)
        head = copy.deepcopy(probe) if self.head_init == "probe" else nn.Linear(frozen.feature_dim, train.num_classes)
        tuned = self.finetune(copy.deepcopy(record.encoder), head.train(), train, record.seed, progress)
        down_after = downstream_metrics(tuned, test, triggered)
        before = probe_acc_asr(record.encoder, record, record_probe(record))
        after = probe_acc_asr(tuned.encoder, record)
        out: dict[str, Any] = repair_metrics(record.baseline, after)
        out.update({f"{k}_{tag}": v for tag, m in (("before", before), ("after", after)) for k, v in m.items()
                    if k not in ("acc", "asr")})
        out.update({f"downstream_{k}_{tag}": v for tag, m in (("before", down_before), ("after", down_after))
                    for k, v in m.items()})
        out["downstream_dataset"] = self.dataset
        out["adaptation"] = (f"the encoder is fine-tuned end to end with a linear head ({self.head_init} init) on a "
                             f"different labelled data set ({self.dataset}); the original task is re-read with a "
                             "linear probe refitted on clean labels, the downstream task's backdoor as the largest "
                             "pile-up of triggered inputs in one class")
        return out
