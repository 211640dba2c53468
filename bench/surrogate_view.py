"""What the attacker's surrogate sees: can it tell the target class from each other class, and can
gradient matching make its poisons teach the backdoor?

The learned trigger (`cba.triggers.optimize`) aims triggered images at the target as the attacker's
surrogate encoder sees it. This bench trains that surrogate exactly as the trigger stage does (the
attacker's pool of `surrogate_size` training images, SimCLR, params.yaml's trigger settings) and reports:

- `--epochs`: at every `--every` epochs, the AUROC of the target class against each other class (test
  images) by (a) cosine to the clean target centroid, the head `head: centroid` pulls towards, and (b) a
  target-versus-rest logistic regression fitted on the attacker's pool with the labels the attacker holds
  (which images are target class). 0.5: the surrogate cannot tell the two classes apart, so no pull
  towards its target can favour one over the other.
- `--matching-steps N`: after the warm-up, N signed-gradient steps on the pattern that minimise the
  differential gradient-matching loss (`cba.triggers.matching`), once with the augmentation draws held
  fixed (can a universal pattern align the gradients at all?) and once with fresh draws each step (as the
  trigger stage optimises). Every tenth step prints the loss on draws never optimised on: 1 - cos, so
  1.0 is no alignment.

    OMP_NUM_THREADS=2 python bench/surrogate_view.py --epochs 40 --every 10            # about 3 min
    OMP_NUM_THREADS=2 python bench/surrogate_view.py --epochs 10 --every 10 --matching-steps 40
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from cba.augment import build_augment
from cba.attack import params_splits
from cba.env import command_line, environment
from cba.errors import BenchParser, run_script
from cba.evaluate import to_float
from cba.models import build_backbone
from cba.params_file import add_params_options, params_from_args
from cba.ssl import build_method
from cba.train import TrainConfig, train
from cba.triggers.fitting import attacker_pool
from cba.triggers.matching import backdoor_gradient, batch_statistics, matching_loss, poison_gradient
from cba.triggers.optimize import SURROGATE_BATCH, OptimizeConfig, _all_features, surrogate_seed, target_head

REPO = Path(__file__).resolve().parents[1]


def separability(encoder, pool_images, pool_is_target, test) -> dict[str, Any]:
    """Per-class AUROC of the target against that class on test images, by centroid cosine and by a probe."""
    encoder.eval()
    pool, test_features = (F.normalize(_all_features(encoder, to_float(x)), dim=1).numpy()
                           for x in (pool_images, test.images))
    centroid = pool[pool_is_target].mean(0)
    scaler = StandardScaler().fit(pool)
    probe = LogisticRegression(max_iter=2000, class_weight="balanced").fit(scaler.transform(pool), pool_is_target)
    scores = {"centroid": test_features @ centroid, "probe": probe.decision_function(scaler.transform(test_features))}
    is_target = test.labels == 0
    out: dict[str, Any] = {name: {"all": round(float(roc_auc_score(is_target, s)), 3)} for name, s in scores.items()}
    for c in range(1, test.num_classes):
        pair = is_target | (test.labels == c)
        for name, s in scores.items():
            out[name][test.classes[c]] = round(float(roc_auc_score(is_target[pair], s[pair])), 3)
    encoder.train()
    return out


def matching_run(method, data, target_mask, config: OptimizeConfig, steps: int, fixed_draws: bool, seed: int) -> list[dict]:
    """Signed steps on the differential matching loss; the loss on held-out draws every tenth step."""
    augment = build_augment("ssl", data.shape[-1], False, config.min_scale)
    gen = torch.Generator().manual_seed(seed)
    method.eval()  # the backdoor gradient reads the encoder as a downstream user would; matching switches to batch statistics
    head = target_head(method.encoder, data, target_mask, config.clusters, config.head, gen)
    half = config.batch_size // 2
    targets = data[torch.as_tensor(np.flatnonzero(target_mask))[:half]]
    others = torch.as_tensor(np.flatnonzero(~target_mask))
    negatives, triggered_pool = data[others[:half]], data[others[half:half + config.batch_size]]
    eps = config.linf / 255
    delta = torch.zeros(1, *data.shape[1:])
    rows = []
    for step in range(steps + 1):
        if step % 10 == 0:
            backdoor = backdoor_gradient(method.encoder, head, (triggered_pool + delta).clamp(0, 1))
            torch.manual_seed(10_000 + step)  # draws the optimisation never used
            with batch_statistics(method):
                held_out = poison_gradient(method, targets, delta, negatives, augment, config.temperature)
                rows.append({"step": step, "held_out_match": round(float(matching_loss(held_out, backdoor).detach()), 3)})
            print(json.dumps({"fixed_draws": fixed_draws, **rows[-1]}), flush=True)
        if step == steps:
            break
        delta.requires_grad_(True)
        backdoor = backdoor_gradient(method.encoder, head, (triggered_pool + delta.detach()).clamp(0, 1))
        torch.manual_seed(seed if fixed_draws else seed + step + 1)
        with batch_statistics(method):
            loss = matching_loss(poison_gradient(method, targets, delta, negatives, augment, config.temperature), backdoor)
        grad, = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = (delta - config.step_size * eps * grad.sign()).clamp(-eps, eps)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = BenchParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10, help="surrogate warm-up epochs")
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--matching-steps", type=int, default=0)
    add_params_options(parser, REPO / "params.yaml")
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (the surrogate's training)")
    args = parser.parse_args(argv)
    command = command_line(argv)
    started = time.perf_counter()
    params = params_from_args(args, parser)
    seed = int(params.get("seed", 0))
    train_set, test = params_splits(params)
    trigger_params = params["trigger"]["params"]
    pool = attacker_pool(len(train_set), trigger_params["surrogate_size"], seed)
    images, is_target = train_set.images[pool], train_set.labels[pool] == int(params.get("target_class", 0))
    config = OptimizeConfig(**{k: v for k, v in trigger_params.items() if k != "surrogate_size"})
    surrogate = surrogate_seed(seed)
    torch.manual_seed(surrogate)
    method = build_method("simclr", build_backbone(config.surrogate_backbone, width=config.surrogate_width),
                          temperature=config.temperature)
    rows: list[dict] = []

    def evaluate(encoder, epoch: int) -> dict:
        rows.append({"epoch": epoch, **separability(encoder, images, is_target, test)})
        print(json.dumps(rows[-1]), flush=True)
        return {}

    train_config = TrainConfig(epochs=args.epochs, batch_size=SURROGATE_BATCH, lr=config.surrogate_lr,
                               warmup_epochs=min(2, args.epochs // 4), seed=surrogate, eval_every=args.every)
    train(method, images, np.zeros(len(images), dtype=np.int64), build_augment("ssl", images.shape[1], False,
          config.min_scale), train_config, torch.device("cpu"), evaluate=evaluate, progress=not args.quiet)
    result: dict[str, Any] = {"separability": rows}
    if args.matching_steps:
        data = to_float(images)
        result["matching"] = {kind: matching_run(method, data, is_target, config, args.matching_steps, kind == "fixed", seed)
                              for kind in ("fixed", "fresh")}
    result["_run"] = {"command": command, "env": environment("cpu"), "seconds": round(time.perf_counter() - started, 1)}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    run_script(main)
