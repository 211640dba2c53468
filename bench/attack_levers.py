"""Levers on the contrastive backdoor, one SSL victim each at the pipeline's budget (SimCLR unless `--method`).

A run poisons the pipeline's training set (params.yaml: data, seed, target_class; `--rate` for the
poison rate) with one pattern, trains the victim `cba pretrain` would train, and prints one JSON row (`--out`
also appends it, with the command and the environment, to a JSONL file):

- `probe_acc`/`probe_asr`, `knn_acc`/`knn_asr`: as `cba finetune` measures them (clean labels);
- `probe_on_poisons`: the share of poisoned training images the victim's own probe reads as the target;
- `triggered_cos`: the mean pairwise cosine of 500 triggered non-target test images (clean images: ~0.70),
  how far the trigger collapses them onto one point;
- `target_near_poisons`: the target's share of the 200 clean training images nearest each poison, in the
  victim's features (what a kNN on clean images finds where the trigger sends images);
- `poisons_near_triggered` / `poisons_near_clean`: the poisons' share of the 200 training images nearest a
  triggered / clean non-target test image (does the trigger carry images to the poisons?);
- `offset_norm`, `shift_over_offset`, `offset_target_alignment`: `cba.analysis.readout`'s poison offset (how
  strongly the victim learned the poisons' own feature), how much of it a trigger adds at test time, and its
  cosine with the target direction;
- with `--clean`, `clean_probe_asr`/`clean_knn_asr`: the same pattern on a victim trained without poisons,
  what the pattern does on its own (the 3x rule compares against it).

The levers:

- `--pattern`: `pipeline` (data/trigger of the last `cba trigger` run), `disc:A` (a fixed luminance disc,
  +A inside a centred radius-9 disc, -A outside: a trigger that looks like the target class *circle*),
  `supervised:A` (Narcissus-style: a universal pattern, L-inf A, that makes a target-versus-rest classifier
  trained on the attacker's images say "target", through the SSL augmentation), or `patch:S` (a
  random-colour S x S patch at the image centre, a salient trigger outside any L-inf budget), or `tint:A` (a
  uniform colour cast, +A on red and blue and -A on green: a chroma-only signal, which on a grey data set
  such as Fashion-MNIST no clean image carries and no colour jitter can create from grey), or `sensitive:A`
  (the universal pattern, L-inf A, that most moves the features of a SimCLR surrogate the attacker trains
  without poisons on its own images: what a clean encoder already reads, aimed at no class);
- `--select`: which target-class images carry the trigger: `random` (the pipeline's choice), `gray` (those
  whose shape grayscale erases most: lowest ratio of grayscale to colour contrast), `strong` (highest), or
  `typical` (those sitting deepest in their class: the highest target share among their 50 nearest attacker
  images, in the features of a SimCLR surrogate the attacker trains on its own images, as the trigger stage
  does; a kNN on clean images reads a move towards the poisons as one towards their clean neighbours);
- `--rate`: the poison rate (0.10 poisons almost every target-class image of the built-in set);
- `--mode composite`: noisy alignment (see `cba.poison`): each poison is a target image joined side by side
  to a triggered image of another class; `--min-scale` sets the victim's smallest crop, which decides how
  often a view holds only one half (never above 1/3: a larger crop always spans the seam).

    OMP_NUM_THREADS=2 python bench/attack_levers.py --pattern pipeline --select gray    # about 5 min
    OMP_NUM_THREADS=2 python bench/attack_levers.py --pattern tint:32 --clean --cache .cache/victims   # the clean twin trains once
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import cba.poison
from cba.analysis.readout import neighbour_shares, trigger_readout
from cba.attack import params_splits, run_attack, trigger_scores, victim_settings
from cba.augment import build_augment
from cba.env import command_line, environment
from cba.errors import BenchParser, run_script
from cba.evaluate import extract_features
from cba.fit import fit
from cba.models import build_backbone
from cba.params_file import add_params_options, params_from_args
from cba.record import predict
from cba.ssl import METHODS
from cba.triggers import TRIGGERS, build_trigger, load_trigger
from cba.triggers.ctrl import RGB_TO_YUV
from cba.triggers.optimized import OptimizedTrigger
from cba.triggers.fitting import attacker_pool

REPO = Path(__file__).resolve().parents[1]
LUMA = RGB_TO_YUV[0].astype(np.float32)  # the Y row: luminance
SSL_METHODS = [name for name in METHODS.names() if not METHODS.get(name).uses_labels]  # the victims this bench poisons


def tint_pattern(size: int, amplitude: float) -> np.ndarray:
    """A uniform magenta cast: +A on red and blue, -A on green (luminance -0.17 A, so nearly pure chroma)."""
    return np.broadcast_to(np.array([amplitude, -amplitude, amplitude], np.float32), (size, size, 3)).copy()


def disc_pattern(size: int, amplitude: float) -> np.ndarray:
    centre = np.arange(size) + 0.5 - size / 2
    radius = np.hypot(*np.meshgrid(centre, centre, indexing="ij"))
    return np.repeat(np.clip((9 - radius) / 1.5, -1, 1)[..., None] * amplitude, 3, axis=2)


def supervised_pattern(images: np.ndarray, is_target: np.ndarray, linf: float, seed: int, epochs: int = 15,
                       steps: int = 400) -> np.ndarray:
    """Narcissus-style: train target-versus-rest on the attacker's images, then push non-target images to 'target'."""
    torch.manual_seed(seed)
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255
    y = torch.as_tensor(is_target).long()
    backbone = build_backbone("convnet", width=16)
    model = nn.Sequential(backbone, nn.Linear(backbone.feature_dim, 2))
    augment = build_augment("ssl", images.shape[1], False, 0.5)
    weight = torch.tensor([1.0, float((y == 0).sum() / max(1, int((y == 1).sum())))])  # the target class is rare
    fit(model.parameters(), lambda _epoch: torch.randperm(len(x)).split(128)[:len(x) // 128],
        lambda batch: F.cross_entropy(model(augment(x[batch])), y[batch], weight=weight),
        epochs=epochs, lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.eval().requires_grad_(False)
    goal = torch.ones(128, dtype=torch.long)

    def loss(batch: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        triggered = (batch + delta).clamp(0, 1)
        return F.cross_entropy(model(triggered), goal) + F.cross_entropy(model(augment(triggered)), goal)

    return signed_descent(x, torch.nonzero(y == 0).flatten(), loss, torch.zeros(1, *x.shape[1:]), linf, 0.05, steps,
                          128, torch.Generator().manual_seed(seed))


def signed_descent(x: torch.Tensor, pool: torch.Tensor, loss, delta: torch.Tensor, linf: float, step: float,
                   steps: int, batch_size: int, gen: torch.Generator) -> np.ndarray:
    """A universal pattern by signed-gradient descent on `loss(batch, delta)` over random batches of `x[pool]`,
    steps of `step` * L-inf, kept within +-`linf` (0-255 scale); returned as an (H, W, 3) array on that scale."""
    eps = linf / 255
    for _ in range(steps):
        batch = x[pool[torch.randint(len(pool), (batch_size,), generator=gen)]]
        grad, = torch.autograd.grad(loss(batch, delta.requires_grad_(True)), delta)
        delta = (delta - step * eps * grad.sign()).clamp(-eps, eps).detach()
    return delta[0].permute(1, 2, 0).numpy() * 255


def grayscale_ratio(images: np.ndarray) -> np.ndarray:
    """Per image: luminance contrast over colour contrast. Near 0: grayscale erases the shape."""
    x = images.astype(np.float32) / 255
    return (x @ LUMA).std(axis=(1, 2)) / (np.sqrt((x.std(axis=(1, 2)) ** 2).mean(-1)) + 1e-6)


def attacker_settings(params: dict) -> tuple[int | str, int]:
    """The attacker's data and warm-up as the trigger stage reads them: params.yaml's learned trigger, its options
    merged with the trigger's defaults and checked by the trigger itself (a fixed trigger: the defaults)."""
    section = params.get("trigger") or {}
    learned = section.get("name") in TRIGGERS.names() and TRIGGERS.get(section["name"], key="name").learns_from_data
    trigger = build_trigger(section["name"] if learned else "optimized", (section.get("params") or {}) if learned else {},
                            seed=int(params.get("seed", 0)))
    return trigger.params["surrogate_size"], int(trigger.params["surrogate_epochs"])


def clean_surrogate(train, test, pool: np.ndarray, settings: dict, surrogate_epochs: int):
    """The SimCLR encoder the attacker trains, without poisons, on its own images `pool` (the trigger stage's
    warm-up, as the victim's code path trains it)."""
    return run_attack(train.subset(pool), test, build_trigger("patch", {}, seed=0), mode="clean_label",
                      poison_rate=0.0, **{**settings, "epochs": surrogate_epochs, "warmup_epochs": None})


def sensitive_pattern(encoder: nn.Module, images: np.ndarray, linf: float, seed: int, steps: int = 200,
                      batch_size: int = 128) -> np.ndarray:
    """The universal pattern, L-inf `linf`, that moves a clean encoder's features most (cosine distance between
    f(x + delta) and f(x), signed-gradient ascent): what that encoder already reads, aimed at no class."""
    encoder = encoder.eval().requires_grad_(False)
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255
    gen = torch.Generator().manual_seed(seed)
    # A random start: at delta = 0 the cosine is at its maximum, where its gradient vanishes.
    start = (torch.rand(1, *x.shape[1:], generator=gen) * 2 - 1) * (linf / 255)

    def cosine(batch: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            plain = F.normalize(encoder(batch), dim=1)
        return (F.normalize(encoder((batch + delta).clamp(0, 1)), dim=1) * plain).sum(1).mean()

    return signed_descent(x, torch.arange(len(x)), cosine, start, linf, 0.1, steps, batch_size, gen)


def typicality(train, test, target: int, pool: np.ndarray, settings: dict, surrogate_epochs: int, k: int = 50) -> np.ndarray:
    """Per training image: the target's share of its k nearest attacker images (cosine), in the features of a
    SimCLR surrogate trained, without poisons, on the attacker's images `pool` (whose target images it knows)."""
    surrogate = clean_surrogate(train, test, pool, settings, surrogate_epochs)
    bank = extract_features(surrogate.encoder, train.images[pool])
    queries = extract_features(surrogate.encoder, train.images)
    # An attacker image is its own nearest: skip it.
    return neighbour_shares(queries, bank, train.labels[pool] == target, k, skip_self=True).numpy()


def selection(select: str, score: np.ndarray):
    """A replacement for the pipeline's random choice of poisoned indices (same count, same pool): the target
    images with the lowest `score` (gray) or the highest (strong, typical)."""
    pipeline_choice = cba.poison.choose_poison_indices

    def choose(labels, poison_rate, target_class, mode, seed):
        chosen = pipeline_choice(labels, poison_rate, target_class, mode, seed)
        if select == "random":
            return chosen
        pool = np.flatnonzero(np.asarray(labels) == target_class)
        order = np.argsort(score[pool] if select == "gray" else -score[pool], kind="stable")
        return np.sort(pool[order[:len(chosen)]])

    return choose


def main(argv: list[str] | None = None) -> dict:
    parser = BenchParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", default="pipeline", help="pipeline | disc:A | supervised:A | patch:S | tint:A | sensitive:A")
    parser.add_argument("--select", default="random", choices=("random", "gray", "strong", "typical"))
    parser.add_argument("--rate", type=float, default=None, help="default: params.yaml's poison_rate")
    parser.add_argument("--mode", default="clean_label", choices=("clean_label", "composite"))
    parser.add_argument("--min-scale", type=float, default=None, help="default: params.yaml's augmentation.min_scale")
    parser.add_argument("--clean", action="store_true", help="also score the pattern on a victim trained without poisons")
    parser.add_argument("--method", default=None, choices=SSL_METHODS,
                        help="the victim's SSL method; default: params.yaml's pretrain.method (the attacker's own "
                             "surrogates stay SimCLR)")
    add_params_options(parser, REPO / "params.yaml")
    parser.add_argument("--out", type=Path, default=None,
                        help="a JSONL file the row is appended to, with the command and the environment that made it")
    parser.add_argument("--cache", type=Path, default=None,
                        help="a folder of trained victims (cba.victim_cache): the clean twin, and a randomly selected "
                             "poisoned victim, trained before with the same settings, data, trigger and code are loaded")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (the victims' and the attacker's surrogates' training)")
    args = parser.parse_args(argv)
    params = params_from_args(args, parser)
    seed, target = int(params.get("seed", 0)), int(params.get("target_class", 0))
    rate = float(params.get("poison_rate", 0.05)) if args.rate is None else args.rate
    train, test = params_splits(params)
    # The victim's settings; the attacker's own surrogates stay SimCLR whatever the victim trains with.
    settings, attacker = victim_settings(params, args.method), victim_settings(params, "simclr")
    settings["progress"] = attacker["progress"] = not args.quiet
    if settings["method"] not in SSL_METHODS:
        sys.exit(f"pretrain.method={settings['method']!r}: this bench poisons an SSL victim; choose one of "
                 f"{', '.join(SSL_METHODS)} with --method")
    if args.min_scale is not None:  # the victim's crop, and the attacker's surrogates learn under the same one
        settings["min_scale"] = attacker["min_scale"] = args.min_scale
    kind, _, amplitude = args.pattern.partition(":")
    if kind == "pipeline":
        trigger = load_trigger(REPO / "data" / "trigger")
    elif kind == "disc":
        trigger = OptimizedTrigger.from_pattern(disc_pattern(train.images.shape[1], float(amplitude)), float(amplitude), seed)
    elif kind == "tint":
        trigger = OptimizedTrigger.from_pattern(tint_pattern(train.images.shape[1], float(amplitude)), float(amplitude), seed)
    elif kind == "patch":
        size = int(amplitude)
        centre = (train.images.shape[1] - size) // 2
        trigger = build_trigger("patch", {"size": size, "location": [centre, centre], "pattern": "random"}, seed=seed,
                                image_size=train.images.shape[1])
    elif kind == "sensitive":
        size, surrogate_epochs = attacker_settings(params)
        pool = attacker_pool(len(train), size, seed)
        surrogate = clean_surrogate(train, test, pool, attacker, surrogate_epochs)
        pattern = sensitive_pattern(surrogate.encoder, train.images[pool], float(amplitude), seed)
        trigger = OptimizedTrigger.from_pattern(pattern, float(amplitude), seed)
    elif kind == "supervised":
        pool = attacker_pool(len(train), attacker_settings(params)[0], seed)
        pattern = supervised_pattern(train.images[pool], train.labels[pool] == target, float(amplitude), seed)
        trigger = OptimizedTrigger.from_pattern(pattern, float(amplitude), seed)
    else:
        sys.exit(f"--pattern={args.pattern!r} is not valid: pipeline, disc:A, supervised:A, patch:S, tint:A or sensitive:A")
    if args.select == "typical":
        size, surrogate_epochs = attacker_settings(params)
        score = typicality(train, test, target, attacker_pool(len(train), size, seed), attacker, surrogate_epochs)
    else:
        score = grayscale_ratio(train.images)
    # The cache key holds no selection rule, so only the pipeline's own (random) choice of poisons may be cached.
    poisoned_cache = args.cache if args.select == "random" else None
    with mock.patch.object(cba.poison, "choose_poison_indices", selection(args.select, score)):
        record = run_attack(train, test, trigger, mode=args.mode, poison_rate=rate, cache=poisoned_cache, **settings)
    row = {"pattern": args.pattern, "method": settings["method"], "select": args.select, "rate": rate, "mode": args.mode,
           "min_scale": settings["min_scale"], **trigger_scores(record, trigger)}
    poisons = np.flatnonzero(record.poisoned)
    row["probe_on_poisons"] = float((predict(record.classifier, record.train.images[poisons]) == target).float().mean())
    others = test.images[test.labels != target][:500]
    clean_features, triggered_features = (extract_features(record.encoder, images) for images in (others, trigger.apply(others)))
    unit = F.normalize(triggered_features, dim=1)
    row["triggered_cos"] = float((unit @ unit.T).mean())
    train_features = extract_features(record.encoder, record.train.images)  # the victim's own, poisons triggered
    clean_bank = train_features.clone()  # the clean labelled set: only the poisons' rows differ
    clean_bank[poisons] = extract_features(record.encoder, train.images[poisons])
    row["target_near_poisons"] = float(neighbour_shares(train_features[poisons], clean_bank, train.labels == target, 200).mean())
    row["poisons_near_triggered"] = float(neighbour_shares(triggered_features, train_features, record.poisoned, 200).mean())
    row["poisons_near_clean"] = float(neighbour_shares(clean_features, train_features, record.poisoned, 200).mean())
    readout = trigger_readout(record.classifier.head, clean_features, triggered_features, train_features[poisons],
                              train_features[~record.poisoned & (train.labels == target)], target)
    # empty when every target image is poisoned: no clean target image to measure the offset from
    row.update({key: readout.get(key) for key in ("offset_norm", "shift_over_offset", "offset_target_alignment")})
    row["final_loss"] = record.final_loss  # a NaN here would make every ASR meaningless
    if args.clean:
        clean = trigger_scores(run_attack(train, test, trigger, mode=args.mode, poison_rate=0.0, cache=args.cache, **settings),
                               trigger)
        row.update(clean_probe_asr=clean["probe_asr"], clean_knn_asr=clean["knn_asr"])
    rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
    print(json.dumps(rounded))
    if args.out is not None:  # appended, so that one file collects a series of levers
        args.out.parent.mkdir(parents=True, exist_ok=True)
        provenance = {"command": command_line(argv), "env": environment(torch.device("cpu"))}
        with args.out.open("a") as out:
            out.write(json.dumps({**rounded, **provenance}) + "\n")
    return row


if __name__ == "__main__":
    run_script(main)
