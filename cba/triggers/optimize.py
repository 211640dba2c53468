"""Learn one universal additive trigger against the SSL augmentations (after BLTO, Sun et al. ICLR 2024).

The attacker holds unlabelled images from the victim's distribution and the
target-class images it will poison. It trains a surrogate encoder on them with
SimCLR, then alternates (the bi-level part):

- lower level: a short SimCLR fine-tune of the surrogate on the attacker's data
  *poisoned with the current pattern* (a `poison_share` of the target-class images carry it), which
  simulates what the victim's pretraining will do with the poisons;
- upper level: steps on the perturbation delta, which stays within the budget
  ||delta||_inf <= linf / 255 (signed-gradient steps on one universal pattern,
  or Adam on a generator of per-image patterns: `cba.triggers.perturbation`),
  minimising

      w_target * L_target + w_agree * L_agree + w_clean * L_clean + w_neutral * L_neutral + w_divert * L_divert
      + w_salient * L_salient

  where, with f the L2-normalised surrogate features and C the centroids
  (row 0: the clean target class; the rest: k-means of the other images),

  - L_target = CE(f(x + delta) C^T / t, 0) + CE(f(A(x + delta)) C^T / t, 0):
    triggered non-target images should have the target centroid as their
    nearest, both as the test set shows them (no augmentation) and as a
    training view does;
  - L_agree = -E[ f(A1(x + delta)) . f(A2(x + delta)) ]: the two views of a
    triggered image agree, so the trigger is a feature contrastive learning
    keeps.

  A, A1, A2 are independent draws of the same kornia pipeline the victim uses
  (`eot=False` drops them: the pattern is optimised on raw images only).

Options, all off by default but `w_neutral` (docs/results/levers.md has what each did at the default budget):

- `ensemble`: several independently initialised surrogates, each warmed up and
  poisoned alike; the trigger steps take turns on them;
- `hard_negatives`: the non-target images nearest the target centroid get a
  centroid (pseudo-label) of their own;
- `w_match`: a gradient-matching term (`cba.triggers.matching`): training on
  the poisons should move the surrogate where the target term wants it.
- `w_clean`: L_clean, the mean probability of the target under the head of
  a frozen copy of the warmed-up surrogate, which never sees a poison: a
  pattern that copy already reads as the target is an adversarial pattern,
  not a backdoor. Its hit rate is recorded every round whatever the weight.
- `w_neutral`: L_neutral, KL(h'(x) || h'(x + delta)) under the same frozen
  copy and its head h': the copy should read a triggered image as it reads the
  clean one. Where L_clean only forbids the pattern's own pull to the target,
  this forbids every pull: a pattern that looks like some class (a texture
  the probe reads as *checker*) diverts triggered images there on any encoder.
- `w_divert`: L_divert, the same KL as L_neutral but under the copy's linear probe and over the
  non-target classes only (the target's probability left out, the rest renormalised): the pattern may
  pull towards the target, but not move triggered images from one other class to another (a texture
  the probe reads as *checker*), which is where the victim's probe sends most triggered images that miss.
- `w_salient`: L_salient, the mean cosine between the frozen copy's features of a triggered image and of
  the clean one: lower when the pattern moves the features more. With `w_neutral` keeping the copy's reading
  of the classes, it asks for a pattern the clean encoder notices strongly, in directions its head does not
  read: whether the poisons' push grows with how much the pattern moves the features, not with its pull.
- `clean_head`: what the frozen copy reads through, for both terms: the same kind of head as `head`, or
  another. A nearest-centroid head sees only the features' directions; a linear probe on standardised
  features, like the victim's, also sees the small directions standardisation magnifies.

Every random draw comes from the seed, so the pattern is deterministic on one
machine.
"""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from cba.progress import tqdm

from cba.augment import build_augment
from cba.evaluate import train_linear_probe
from cba.models import build_backbone
from cba.ssl import build_method
from cba.train import TrainConfig, train
from cba.triggers.fit_options import OptimizeConfig
from cba.triggers.matching import backdoor_gradient, batch_statistics, matching_loss, poison_gradient
from cba.triggers.perturbation import GeneratedPattern, PatternGenerator, UniversalPattern, stamp


def _raw(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return encoder(x.contiguous(memory_format=torch.channels_last)).float()


SURROGATE_BATCH = 256
READOUT = 1000  # non-target images the clean copy's probe reads the pattern on, after every round
# Seeds of the ensemble's surrogates: seed + stride, seed + 2 stride, ... (far apart, so no two runs share one).
SURROGATE_SEED_STRIDE = 7919


def surrogate_seed(seed: int, member: int = 0) -> int:
    """The seed of the attacker's surrogate `member`: its initialisation and data order.

    Never `seed` itself: the victim is initialised from it, and an attacker does not know the victim's
    weights. A surrogate that trained on the victim's images from the victim's initial weights would be the
    victim's clean twin, bit for bit."""
    return seed + SURROGATE_SEED_STRIDE * (member + 1)


def _pretrain_surrogate(method: nn.Module, images: np.ndarray, augment: nn.Module, epochs: int, lr: float,
                        seed: int, device: torch.device, bar: tqdm) -> None:
    """SimCLR on the attacker's images; `bar` advances by one per SGD step."""
    if epochs <= 0:
        return
    config = TrainConfig(epochs=epochs, batch_size=SURROGATE_BATCH, lr=lr, warmup_epochs=min(2, epochs // 4), seed=seed,
                         eval_every=1)
    steps = -(-len(images) // SURROGATE_BATCH)

    def advance(_encoder: nn.Module, _epoch: int) -> dict:
        bar.update(steps)
        return {}

    train(method, images, np.zeros(len(images), dtype=np.int64), augment, config, device, evaluate=advance, progress=False)


@torch.no_grad()
def _all_features(encoder: nn.Module, data: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    return torch.cat([encoder(data[i:i + chunk].contiguous(memory_format=torch.channels_last)).float()
                      for i in range(0, len(data), chunk)])


@torch.no_grad()
def pseudo_labels(features: torch.Tensor, target_mask: np.ndarray, clusters: int, gen: torch.Generator,
                  iterations: int = 20, hard_negatives: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Label 0 for the target-class images; 1..k for spherical k-means clusters of the others (k = clusters - 1).

    The attacker knows no other labels, so the rest of the feature space is
    summarised by unsupervised clusters, as a downstream classifier would carve
    it. Returns the labels and the centroids (row 0: the target class's)."""
    features = F.normalize(features, dim=1)
    mask = torch.as_tensor(target_mask)
    target = F.normalize(features[mask].mean(0), dim=0)
    others = features[~mask]
    hard = torch.zeros(len(others), dtype=torch.bool)
    if hard_negatives and clusters > 2 and len(others) > int(mask.sum()):
        # The non-target images nearest the target's centroid (as many as there are target images) form a
        # centroid of their own: the look-alike classes a downstream classifier must tell from the target.
        hard[(others @ target).topk(int(mask.sum())).indices] = True
    rest = others[~hard]
    k = max(1, min(clusters - 1 - int(hard.any()), len(rest)))
    centroids = rest[torch.randperm(len(rest), generator=gen)[:k]].clone()
    for _ in range(iterations):
        assign = (rest @ centroids.T).argmax(1)
        for j in range(k):
            members = rest[assign == j]
            if len(members):
                centroids[j] = F.normalize(members.mean(0), dim=0)
    if hard.any():
        centroids = torch.cat([F.normalize(others[hard].mean(0), dim=0)[None], centroids])
    labels = torch.zeros(len(features), dtype=torch.long)
    other_labels = (others @ centroids.T).argmax(1) + 1
    if hard.any():
        other_labels[hard] = 1
    labels[~mask] = other_labels
    return labels, torch.cat([target[None], centroids])


def target_head(encoder: nn.Module, data: torch.Tensor, target_mask: np.ndarray, clusters: int, kind: str,
                gen: torch.Generator, temperature: float = 0.1, hard_negatives: bool = False,
                labels: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits over {target, the other clusters} for raw encoder features: the attacker's stand-in for the
    victim's downstream classifier.

    - centroid: cosine to each centroid / temperature (a nearest-centroid classifier, as kNN votes);
    - probe: a linear probe on standardised features, trained on the pseudo-labels exactly as the
      victim's probe is trained on true labels (`cba.evaluate.train_linear_probe`).

    `labels` (the target's 0, the other classes 1, 2, ...): an attacker that holds labelled images reads through
    heads fitted on them instead of the pseudo-labels (a probe, or the classes' centroids)."""
    features = _all_features(encoder, data)
    if labels is None:
        labels, centroids = pseudo_labels(features, target_mask, clusters, gen, hard_negatives=hard_negatives)
    else:
        labels, centroids = torch.as_tensor(labels).long(), None  # the classes' centroids, if a centroid head asks
    classes = len(centroids) if centroids is not None else int(labels.max()) + 1
    if kind == "centroid":
        if centroids is None:
            normed = F.normalize(features, dim=1)
            centroids = torch.stack([F.normalize(normed[labels == c].mean(0), dim=0) for c in range(classes)])
        return lambda raw: F.normalize(raw, dim=1) @ centroids.T / temperature
    seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
    # About 300 SGD steps whatever the pool size: features are computed once, so this takes a second.
    epochs = -(-300 // -(-len(features) // 1024))
    probe = train_linear_probe(features.cpu(), labels, classes, epochs=epochs, seed=seed).to(data.device)
    for p in probe.parameters():
        p.requires_grad_(False)
    return probe


def objective_terms(encoder: nn.Module, x: torch.Tensor, delta: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                    augment: nn.Module | None, clip_gradient: str = "zero") -> dict[str, torch.Tensor]:
    """The two terms of the trigger objective on one batch (lower is better for the attacker).

    The target term is the cross-entropy of "the head says target" (class 0),
    as the test set shows triggered images (no augmentation) and as a training
    view does. `hit_rate`, a label-free proxy of ASR on the surrogate, is the
    share of triggered images the head sends to the target."""
    triggered = stamp(x, delta, clip_gradient)
    plain = head(_raw(encoder, triggered))
    goal = torch.zeros(len(x), dtype=torch.long, device=x.device)
    terms = {"hit_rate": (plain.detach().argmax(1) == 0).float().mean()}
    if augment is None:
        return {**terms, "target": F.cross_entropy(plain, goal), "agree": torch.zeros((), device=x.device)}
    raw1, raw2 = _raw(encoder, augment(triggered)), _raw(encoder, augment(triggered))
    target = F.cross_entropy(plain, goal) + F.cross_entropy(head(raw1), goal)
    agree = -(F.normalize(raw1, dim=1) * F.normalize(raw2, dim=1)).sum(1).mean()
    return {**terms, "target": target, "agree": agree}


OPTIONAL_TERMS = ("match", "neutral", "divert", "salient")


def _reading_shift(triggered: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
    """KL(plain || triggered) between two readings (logits) of the same images, averaged over them."""
    return F.kl_div(triggered.log_softmax(1), plain.log_softmax(1), log_target=True, reduction="batchmean")


def clean_terms(encoder: nn.Module, head: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                delta: torch.Tensor, clip_gradient: str = "zero", neutral: bool = False,
                divert_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
                salient: bool = False) -> dict[str, torch.Tensor]:
    """How an encoder that never saw a poison reads the triggered images, from one forward pass of them (and,
    for the two KL terms and the salience, one of the clean images).

    - `clean`: the mean probability of the target under that encoder's head (what `w_clean` penalises: a
      pattern the clean encoder already reads as the target is an adversarial pattern, not a backdoor, and the
      victim's clean twin reads it too);
    - `clean_hit_rate`: the share sent to the target, the attacker's own estimate of the clean twin's ASR;
    - `neutral` (when asked): KL(head(x) || head(x + delta)), 0 when the pattern changes nothing that head
      reads, whichever class the change would favour (what `w_neutral` penalises);
    - `divert` (when a `divert_head` is given): the same KL under that head over the NON-target classes only
      (the target's column left out, the rest renormalised), 0 when the pattern moves no image from one other
      class to another, whatever it does towards the target (what `w_divert` penalises);
    - `salient` (when asked): the mean cosine between the encoder's features of the triggered and the clean
      images, 1 when the pattern moves no feature (what `w_salient` lowers)."""
    raw = _raw(encoder, stamp(x, delta, clip_gradient))
    logits = head(raw)
    terms = {"clean": logits.softmax(1)[:, 0].mean(), "clean_hit_rate": (logits.detach().argmax(1) == 0).float().mean()}
    if neutral or divert_head is not None or salient:
        with torch.no_grad():
            plain = _raw(encoder, x)
        if salient:
            terms["salient"] = F.cosine_similarity(raw, plain, dim=1).mean()
        if neutral:
            terms["neutral"] = _reading_shift(logits, head(plain))
        if divert_head is not None:
            terms["divert"] = _reading_shift(divert_head(raw)[:, 1:], divert_head(plain)[:, 1:])
    return terms


@torch.no_grad()
def probe_hit_rate(encoder: nn.Module, head: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                   perturbation: Callable[[torch.Tensor], torch.Tensor], chunk: int = 500) -> float:
    """The share of the images `x`, triggered, that `head` reads as the target (class 0)."""
    hits = sum(int((head(_raw(encoder, stamp(part, perturbation(part)))).argmax(1) == 0).sum())
               for part in x.split(chunk))
    return hits / max(1, len(x))


def match_term(method: nn.Module, data: torch.Tensor, batch: torch.Tensor, delta: torch.Tensor,
               head: Callable[[torch.Tensor], torch.Tensor], target_pool: torch.Tensor, augment: nn.Module,
               config: OptimizeConfig, gen: torch.Generator) -> torch.Tensor:
    """The gradient-matching term on one batch: do the poisons' gradients point where the backdoor's does?"""
    backdoor = backdoor_gradient(method.encoder, head, stamp(data[batch], delta.detach()))
    half = max(2, config.batch_size // 2)
    targets = data[target_pool[torch.randint(len(target_pool), (half,), generator=gen)]]
    with batch_statistics(method):
        poison = poison_gradient(method, targets, delta, data[batch[:half]], augment, config.temperature,
                                 differential=config.match == "differential", clip_gradient=config.clip_gradient)
        return matching_loss(poison, backdoor)


def poison_carriers(target_mask: np.ndarray, share: float, seed: int) -> np.ndarray:
    """The attacker's target-class images that carry the pattern in the poisoned surrogate epochs: all of them
    at share 1, else round(share * count) (at least one) drawn from the seed on a stream of their own."""
    if share >= 1:
        return target_mask
    targets = np.flatnonzero(target_mask)
    count = max(1, round(share * len(targets)))
    carriers = np.zeros_like(target_mask)
    carriers[targets[np.random.default_rng([seed, 0x5A7E]).permutation(len(targets))[:count]]] = True
    return carriers


def _perturbation(config: OptimizeConfig, size: int, eps: float, seed: int,
                  device: torch.device) -> UniversalPattern | GeneratedPattern:
    if config.form == "universal":
        return UniversalPattern(size, config.resolution, eps, config.step_size, device, config.symmetric)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = PatternGenerator(config.hidden).to(device)
    return GeneratedPattern(generator, eps, config.lr)


def optimize_trigger(images: np.ndarray, target_mask: np.ndarray, config: OptimizeConfig, seed: int,
                     device: torch.device | None = None, progress: bool = True,
                     keep: dict | None = None,
                     labels: np.ndarray | None = None) -> tuple[UniversalPattern | GeneratedPattern, list[dict]]:
    """Learn the trigger from uint8 NHWC `images`; `target_mask` marks the target-class ones.

    Returns the fitted perturbation (`cba.triggers.perturbation`: a pattern, or
    a generator, within +-linf everywhere) and one row of objective figures per
    round. A `keep` dict receives the attacker's models as the fit leaves them (`poisoned`: the surrogates'
    encoders, `clean`: the never-poisoned copy, `clean_probe`: its probe head) and `data`, the images as a
    float tensor, for what is fitted after the pattern (`cba.triggers.activation`). `labels` (`target_first`
    order): the attacker holds its images' classes, and every head reads through them (`fit_labels`).
    """
    device = device or torch.device("cpu")
    target_mask = np.asarray(target_mask, dtype=bool)
    size = images.shape[1]
    eps = config.linf / 255.0
    with torch.random.fork_rng(devices=[]):
        augment = build_augment("ssl", size, config.per_batch, config.min_scale).to(device)
        # One bar over the whole fit, in SGD steps: surrogate warm-ups, poisoned surrogate epochs, trigger steps.
        surrogate_steps = -(-len(images) // SURROGATE_BATCH)
        poisoned_epochs = config.rounds - 1 if config.bilevel else 0
        total = (surrogate_steps * (config.surrogate_epochs + poisoned_epochs) * config.ensemble
                 + config.rounds * config.trigger_steps)
        bar = tqdm(total=total, desc="trigger", unit="step", disable=not progress, mininterval=1.0)
        bar.set_postfix_str("surrogate warm-up")
        # Surrogate k has its own initialisation and data order; k = 0 is the single surrogate of ensemble 1.
        seeds = [surrogate_seed(seed, k) for k in range(config.ensemble)]
        methods = []
        for member_seed in seeds:
            torch.manual_seed(member_seed)
            method = build_method("simclr", build_backbone(config.surrogate_backbone, width=config.surrogate_width),
                                  temperature=config.temperature)
            _pretrain_surrogate(method, images, augment, config.surrogate_epochs, config.surrogate_lr, member_seed,
                                device, bar)
            methods.append(method.to(device))
        data = torch.as_tensor(images).permute(0, 3, 1, 2).float().div(255).to(device)
        # A frozen copy of the warmed-up surrogate, which never sees a poison, and its own head (own generator,
        # so the fit's random stream is the same with or without it).
        clean_encoder = copy.deepcopy(methods[0].encoder).eval().requires_grad_(False)
        given = None if labels is None else torch.as_tensor(labels)
        with torch.random.fork_rng(devices=[]):
            clean_kind = config.head if config.clean_head == "same" else config.clean_head
            clean_head = target_head(clean_encoder, data, target_mask, config.clusters, clean_kind,
                                     torch.Generator().manual_seed(seed + 1), hard_negatives=config.hard_negatives,
                                     labels=given)
            # The copy read through a linear probe whatever `clean_head` is: as the victim's probe reads, so its
            # hit rate is the attacker's estimate of the ASR a victim without poisons shows (the 3x rule's
            # baseline), which a nearest-centroid reading underestimates.
            clean_probe = clean_head if clean_kind == "probe" else target_head(
                clean_encoder, data, target_mask, config.clusters, "probe", torch.Generator().manual_seed(seed + 2),
                hard_negatives=config.hard_negatives, labels=given)
        others = torch.as_tensor(np.flatnonzero(~target_mask))
        readout = data[others[torch.randperm(len(others), generator=torch.Generator().manual_seed(seed + 3))[:READOUT]]]
        target_pool = torch.as_tensor(np.flatnonzero(target_mask))
        gen = torch.Generator().manual_seed(seed)
        carriers = poison_carriers(target_mask, config.poison_share, seed)
        perturbation = _perturbation(config, size, eps, seed, device)
        history: list[dict] = []
        # The terms off by default, in the order the loss adds them, where their weight is on.
        optional = {name: weight for name in OPTIONAL_TERMS if (weight := getattr(config, f"w_{name}")) > 0}
        for round_index in range(config.rounds):
            if config.bilevel and round_index > 0:
                poisoned = images.copy()
                poisoned[carriers] = perturbation.apply_uint8(images[carriers])
                # One poisoned epoch per surrogate: each learns from the poisons, as the victim will.
                for method, member_seed in zip(methods, seeds):
                    _pretrain_surrogate(method, poisoned, augment, 1, config.surrogate_lr, member_seed + round_index,
                                        device, bar)
                    method.to(device)
            encoders = [method.encoder.eval() for method in methods]
            for p in (p for encoder in encoders for p in encoder.parameters()):
                p.requires_grad_("match" in optional)  # matching differentiates through the parameters' gradients
            heads = [target_head(encoder, data, target_mask, config.clusters, config.head, gen,
                                 hard_negatives=config.hard_negatives, labels=given) for encoder in encoders]
            sums = {"target": 0.0, "agree": 0.0, "hit_rate": 0.0, "clean": 0.0, "clean_hit_rate": 0.0,
                    **{name: 0.0 for name in optional}}
            for step in range(config.trigger_steps):
                # Triggered images of the non-target classes: the ones ASR counts.
                batch = others[torch.randint(len(others), (config.batch_size,), generator=gen)]
                member = step % len(encoders)
                delta = perturbation(data[batch])
                match = (match_term(methods[member], data, batch, delta, heads[member], target_pool, augment,
                                    config, gen) if "match" in optional else None)
                terms = objective_terms(encoders[member], data[batch], delta, heads[member],
                                        augment if config.eot else None, config.clip_gradient)
                with torch.set_grad_enabled(config.w_clean > 0 or any(name != "match" for name in optional)):
                    terms.update(clean_terms(clean_encoder, clean_head, data[batch], delta, config.clip_gradient,
                                             neutral="neutral" in optional,
                                             divert_head=clean_probe if "divert" in optional else None,
                                             salient="salient" in optional))
                if match is not None:
                    terms["match"] = match
                loss = config.w_target * terms["target"] + config.w_agree * terms["agree"] + config.w_clean * terms["clean"]
                for name, weight in optional.items():
                    loss = loss + weight * terms[name]
                perturbation.update(loss, round_index)
                for key in sums:
                    sums[key] += float(terms[key].detach()) / config.trigger_steps
                bar.update(1)
            for p in (p for encoder in encoders for p in encoder.parameters()):
                p.requires_grad_(True)
            objective = config.w_target * sums["target"] + config.w_agree * sums["agree"] + config.w_clean * sums["clean"]
            for name, weight in optional.items():
                objective += weight * sums[name]
            row = {"round": round_index + 1, **sums, "objective": objective,
                   "clean_probe_hit_rate": probe_hit_rate(clean_encoder, clean_probe, readout, perturbation)}
            history.append(row)
            bar.set_postfix({k: round(v, 3) for k, v in row.items() if k != "round"})
        bar.close()
    if keep is not None:
        keep.update(poisoned=[method.encoder.eval() for method in methods], clean=clean_encoder,
                    clean_probe=clean_probe, data=data)
    return perturbation, history
