"""Does what the poisons teach grow with the amplitude they carry the pattern at? Victims poisoned with the
pipeline's pattern scaled, read with the pipeline's own test-time trigger.

The 3x rule compares the poisoned victim's ASR with the reference victim's, which never saw a poison: the
pattern's own pull. At test time both read the same trigger, so the pull is fixed by the test-time amplitude
alone, and whatever the poisoned victim reads beyond it is what the poisons taught (the push). This bench
holds the test-time trigger (and so the pull) fixed and changes only the poisons: the same images (the
pipeline's seed picks them), the same pattern, stamped at `s` times its amplitude (L-inf s x linf). Each
victim trains as `cba pretrain` trains one (`cba.attack.victim_settings` of the root's params.yaml) and is
read as `cba finetune` reads one (the weighted kNN and the converged probe on the clean labelled set), with
the pipeline's trigger at each `--test-scales` amplitude; the reference is the pipeline's own
(`data/reference`). The first row is the pipeline's own victim (poisons at s = 1), read, not retrained.

- a push that grows with the poisons' amplitude raises the poisoned reading at a fixed pull, and with it
  the ratio to the reference;
- a push set by the pattern's look, not its strength, leaves the ratio where it was.

Two more things the poisons can carry, for the same question: `--rate` poisons another share of the training
set (the same seeded choice `cba poison` makes), and `--negatives K` stamps the negated pattern on K
non-target training images besides (antithetic poisons, seeded): the victim then sees the pattern's sign go
with the target and its opposite with every other class, a contrast a feature of the pattern could align
with the target's. `--harden EPS` gives each poison, before its pattern, a perturbation of its own within
L-inf EPS (`cba.hardening`): `views` makes its content a worse cue for view agreement on the attacker's
clean surrogate (Turner et al.'s label-consistent poisons, carried to contrastive learning), `target` makes
it more typical of the target class, `random` is the control of the same size.

`--drop N` asks what the clean target images do: the victim trains on the pipeline's poisoned set less N
images (a seeded choice), the same poisons in it. `--drop-from target` leaves out target images that carry no
poison (with all of them out, every target image the victim sees carries the pattern, as when every one is
poisoned, but with the pipeline's count of poisons); `--drop-from other` leaves out as many non-target images,
the control for a smaller set; `--drop-seed` draws another such choice, so that several draws give the
spread of one victim over the training set's draw. `--drop-reference` also trains a victim on the same
smaller set without poisons, the pull the pattern has there.

The poisons' visibility at each amplitude (L-inf, PSNR and SSIM of the poisons against their clean images)
is given beside it: a larger amplitude is a more visible poison.

    OMP_NUM_THREADS=2 python bench/poison_scale.py --root <repo after dvc repro finetune> --scales 1.5 2
    OMP_NUM_THREADS=2 python bench/poison_scale.py --root <repo> --scales 1 --rate 0.025 --negatives 250
    OMP_NUM_THREADS=2 python bench/poison_scale.py --root <repo> --scales 1 --harden 8 --harden-kind views target random
    OMP_NUM_THREADS=2 python bench/poison_scale.py --root <repo> --scales 1 --drop 480 --drop-reference

About as long as `cba pretrain` a victim (2 to 5 minutes on two cores at the default budget).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cba.attack import reader_options, run_attack, victim_settings
from cba.augment import build_augment
from cba.hardening import KINDS, class_centroid, harden, surrogate_reading
from cba.env import command_line, environment, results_header
from cba.errors import BenchParser, run_script
from cba.evaluate import pick_device, read_triggered_sets
from cba.io import write_json
from cba.poison import choose_poison_indices, poison_dataset, triggered_test_set
from cba.readings import (ENCODERS, READERS, pipeline_files, pipeline_params, pipeline_sets, read_pipeline_images,
                          scaled_pattern, unfinished)
from cba.data.base import ImageSet
from cba.triggers import Trigger, load_trigger
from cba.triggers.optimize import surrogate_seed
from cba.triggers.optimized import OptimizedTrigger
from cba.triggers.stealth import change_metrics, stealth_metrics


POISON_RECORD = "metrics/details/poison.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = BenchParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="a repository after `dvc repro finetune`")
    parser.add_argument("--scales", type=float, nargs="+", required=True,
                        help="amplitudes the poisons carry the pattern at, as multiples of the pipeline's")
    parser.add_argument("--test-scales", type=float, nargs="+", default=[1.0],
                        help="amplitudes of the test-time trigger every victim is read with")
    parser.add_argument("--rate", type=float, default=None,
                        help="share of the training set poisoned with the target's images; default: the pipeline's")
    parser.add_argument("--negatives", type=int, default=0,
                        help="non-target training images that also carry the negated pattern (antithetic poisons)")
    parser.add_argument("--harden", type=float, default=0.0,
                        help="L-inf (0-255) of each poison's own hardening perturbation (cba.hardening); 0: none")
    parser.add_argument("--harden-kind", choices=KINDS, nargs="+", default=["views"],
                        help="views or target (fitted on the attacker's clean surrogate), or random (the control); "
                             "several give a victim each")
    parser.add_argument("--harden-steps", type=int, default=20, help="signed steps of a fitted hardening")
    parser.add_argument("--drop", type=int, default=0,
                        help="training images the victims do not see (see --drop-from); the poisons stay")
    parser.add_argument("--drop-from", choices=("target", "other"), default="target",
                        help="target: target images that carry no poison; other: non-target images (the control)")
    parser.add_argument("--drop-seed", type=int, default=None,
                        help="seed of the choice of images left out; default: the pipeline's seed")
    parser.add_argument("--drop-reference", action="store_true",
                        help="also train a victim without poisons on the same smaller set")
    parser.add_argument("--cache", type=Path, default=None, help="a folder of trained victims (cba.victim_cache)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--out", type=Path, default=Path("bench/results/poison_scale.json"),
                        help="the JSON; the table goes beside it as .md")
    args = parser.parse_args(argv)
    bad = [s for s in (*args.scales, *args.test_scales) if not s > 0]
    if bad:
        parser.error(f"scale {bad[0]:g}: every scale must be a number above 0")
    if args.rate is not None and not 0 <= args.rate <= 1:
        parser.error(f"--rate {args.rate:g}: outside [0, 1]")
    if args.negatives < 0:
        parser.error(f"--negatives {args.negatives}: must be 0 or more")
    if not 0 <= args.harden <= 255:
        parser.error(f"--harden {args.harden:g}: outside [0, 255]")
    if args.harden_steps < 1:
        parser.error(f"--harden-steps {args.harden_steps}: must be 1 or more")
    if args.drop < 0:
        parser.error(f"--drop {args.drop}: must be 0 or more")
    if args.drop and args.negatives:
        parser.error(f"--drop {args.drop} with --negatives {args.negatives}: use one at a time")
    if args.drop_reference and not args.drop:
        parser.error("--drop-reference needs --drop N (N above 0)")
    return args


def pipeline_poison_mode(root: Path) -> str:
    """The poison mode the pipeline's `cba poison` resolved (params.yaml's `auto` included), from its record."""
    return json.loads((root / POISON_RECORD).read_text())["mode"]


def with_negatives(images: ImageSet, trigger: Trigger, count: int, target: int, seed: int) -> ImageSet:
    """`images` with the negated pattern of `trigger` stamped on `count` non-target images (a seeded choice)."""
    if count == 0:
        return images
    others = np.flatnonzero(images.labels != target)
    chosen = np.random.default_rng([seed, 0xA17]).choice(others, count, replace=False)
    negated = OptimizedTrigger.from_pattern(-trigger.tensors()["pattern"].numpy(), float(trigger.params["linf"]),
                                            trigger.seed)
    stamped = images.images.copy()
    stamped[chosen] = negated.apply(stamped[chosen])
    return ImageSet(stamped, images.labels.copy(), list(images.classes))


def surrogate_lines(eps: float, readings: dict[str, dict[str, Any]]) -> str:
    """What each fitted hardening (kind -> the surrogate's readings before and after) changed in the attacker's
    clean surrogate's reading of the poisons."""
    if not readings:
        return ""
    lines = [f"- hardened {eps:g} ({kind}): view agreement {r['before']['view_agreement']:.3f} -> "
             f"{r['after']['view_agreement']:.3f}, cosine of a view to the target's centroid "
             f"{r['before']['target_cosine']:.3f} -> {r['after']['target_cosine']:.3f}" for kind, r in readings.items()]
    return ("\nThe attacker's clean surrogate reads the poisons (before their pattern), before -> after the "
            "hardening:\n\n" + "\n".join(lines) + "\n")


def acc_and_asr(sets: list[dict[str, dict]]) -> list[dict[str, dict[str, float]]]:
    """One encoder's ACC and ASR under both readers, per triggered test set."""
    return [{name: {"acc": m[name]["acc"], "asr": m[name]["asr"]} for name in READERS} for m in sets]


def table(rows: list[dict[str, Any]], reference: list[dict[str, dict]], test_scales: list[float], linf: float) -> str:
    lines = ["| poisons at (L-inf) | poisons (+ negated) | poisons' PSNR / SSIM | test trigger L-inf "
             "| poisoned linear ACC / ASR | poisoned kNN ACC / ASR | reference linear / kNN ASR | ratio linear / kNN "
             "| final loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for t, reading, ref in zip(test_scales, row["readings"], reference):
            ratio = " / ".join(f"{reading[n]['asr'] / max(ref[n]['asr'], 1e-3):.1f}x" for n in READERS)
            loss = "–" if row["final_loss"] is None else f"{row['final_loss']:.3f}"
            count = f"{row['poisons']} (+ {row['negatives']})" if row["negatives"] else f"{row['poisons']}"
            if row.get("harden"):
                count += f", hardened {row['harden']:g} ({row['harden_kind']})"
            if row.get("dropped"):
                count += f", {row['dropped']}"
            seen = row["stealth"]
            stealth = "–" if seen is None else f"{seen['psnr']:.1f} / {seen['ssim']:.3f}"
            amplitude = "–" if row["scale"] == 0 else f"{row['scale']:g} ({row['linf']:g})"
            lines.append(f"| {amplitude}{' pipeline' if row['pipeline'] else ''} | {count} | {stealth} | {t * linf:g} "
                         f"| {reading['linear']['acc']:.3f} / {reading['linear']['asr']:.3f} "
                         f"| {reading['knn']['acc']:.3f} / {reading['knn']['asr']:.3f} "
                         f"| {ref['linear']['asr']:.3f} / {ref['knn']['asr']:.3f} | {ratio} | {loss} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Plan:
    """What every victim of one run shares: the pipeline's sets and poisons, the test-time triggers' images, the
    victim's recipe and the readers."""

    args: argparse.Namespace
    clean: ImageSet
    test: ImageSet
    chosen: np.ndarray  # the poisons' indices in `clean`
    dropped: np.ndarray  # the training images a --drop run leaves out (empty without one)
    triggered: list[np.ndarray]
    settings: dict[str, Any]
    mode: str
    rate: float
    options: dict[str, Any]
    linf: float
    device: Any

    def drop_label(self) -> str:
        if not len(self.dropped):
            return ""
        target = self.settings["target_class"]
        whose = f"clean {self.test.classes[target]}" if self.args.drop_from == "target" else "non-target"
        draw = "" if self.args.drop_seed is None else f" (draw {self.args.drop_seed})"
        return f"{len(self.dropped)} {whose} images left out{draw}"


def dropped_images(labels: np.ndarray, chosen: np.ndarray, count: int, source: str, target: int,
                   seed: int) -> np.ndarray:
    """The `count` training images a `--drop` run leaves out, a seeded choice among the target's images that carry
    no poison (`source` target) or among the non-target images (other)."""
    pool = np.flatnonzero(labels == target) if source == "target" else np.flatnonzero(labels != target)
    pool = np.setdiff1d(pool, chosen)
    if count > len(pool):
        whose = "clean target" if source == "target" else "non-target"
        raise SystemExit(f"--drop {count}: more than the {len(pool)} {whose} training images")
    return np.sort(np.random.default_rng([seed, 0xD209]).choice(pool, count, replace=False))


def without(images: ImageSet, dropped: np.ndarray) -> ImageSet:
    keep = np.setdiff1d(np.arange(len(images)), dropped)
    return ImageSet(images.images[keep], images.labels[keep], list(images.classes))


def train_victim(plan: Plan, train: ImageSet, trigger: Trigger, rate: float, what: str,
                 seed: int | None = None) -> tuple[Any, float]:
    """A victim of the pipeline's recipe on `train` (poisoned by `run_attack` at `rate`; from `seed`, default the
    pipeline's), and its final loss."""
    settings = plan.settings if seed is None else {**plan.settings, "seed": seed}
    record = run_attack(train, plan.test, trigger, mode=plan.mode, poison_rate=rate, device=plan.device,
                        progress=not plan.args.quiet, cache=plan.args.cache, **settings)
    final = record.final_loss  # the mean over samples of the last epoch
    if not np.isfinite(final):
        raise SystemExit(f"{what}: the victim's final loss is {final}; its readings would mean nothing")
    return record, final


def attacker_surrogate(plan: Plan, trigger: Trigger) -> tuple[Any, Any]:
    """The attacker's clean surrogate encoder and its target's centroid (`cba.hardening.class_centroid`): a
    victim of the pipeline's recipe trained without poisons from the attacker's own seed (`surrogate_seed`)."""
    surrogate, _ = train_victim(plan, plan.clean, trigger, 0.0, "the attacker's surrogate",
                                seed=surrogate_seed(plan.settings["seed"]))
    # The attacker knows which of its images are the target's (the threat model of the trigger stage).
    target_images = plan.clean.images[plan.clean.labels == plan.settings["target_class"]]
    return surrogate.encoder, class_centroid(surrogate.encoder, target_images)


def with_hardening(plan: Plan, kind: str | None, attacker: tuple[Any, Any] | None) -> tuple[ImageSet, dict[str, Any]]:
    """The training set with the poisons-to-be hardened (`cba.hardening`; the fitted kinds on `attacker`'s
    surrogate and centroid), and what that surrogate reads of the poisons before and after a fitted hardening."""
    images, indices, settings = plan.clean, plan.chosen, plan.settings
    if kind is None:
        return images, {}
    encoder, anchor = attacker if kind != "random" and attacker is not None else (None, None)
    augment = build_augment("ssl", images.images.shape[1], settings["per_batch"], settings["min_scale"])
    changed = images.images.copy()
    changed[indices] = harden(changed[indices], encoder, plan.args.harden, augment=augment, kind=kind,
                              anchor=anchor, steps=plan.args.harden_steps, seed=settings["seed"], device=plan.device)
    readings = {}
    if encoder is not None:  # what the fit changed, as the attacker's surrogate reads the poisons (same draws)
        readings["before"], readings["after"] = (surrogate_reading(encoder, x[indices], augment, anchor)
                                                 for x in (images.images, changed))
    return ImageSet(changed, images.labels.copy(), list(images.classes)), readings


def readings_of(plan: Plan, encoder: Any) -> list[dict[str, dict[str, float]]]:
    return acc_and_asr(read_triggered_sets(encoder, plan.clean.images, plan.clean.labels, plan.test.images,
                                           plan.test.labels, plan.triggered, plan.settings["target_class"],
                                           plan.clean.num_classes, **plan.options))


def victim_rows(plan: Plan, hardened: ImageSet, poison_triggers: dict[float, Trigger], kind: str | None,
                surrogate: dict[str, Any]) -> list[dict[str, Any]]:
    """One victim per poison amplitude, trained on `hardened` (the training set with any hardening), its
    readings with every test-time trigger."""
    args, seed, target = plan.args, plan.settings["seed"], plan.settings["target_class"]
    rows = []
    for scale, poison_trigger in poison_triggers.items():
        if len(plan.dropped):
            # The poisons as `cba poison` stamps them on the whole set, then the dropped images out: the same
            # poisons whatever is left out (a smaller set would change run_attack's seeded choice).
            poisoned = poison_dataset(hardened, poison_trigger, plan.rate, target, plan.mode, seed)
            assert np.array_equal(poisoned.indices, plan.chosen)
            record, final = train_victim(plan, without(poisoned.train, plan.dropped), poison_trigger, 0.0,
                                         f"poisons at scale {scale:g}")
        else:
            # The negatives go on the training images first; the poisons, chosen among the target's, never meet them.
            train = with_negatives(hardened, poison_trigger, args.negatives, target, seed)
            record, final = train_victim(plan, train, poison_trigger, plan.rate, f"poisons at scale {scale:g}")
        rows.append({"scale": scale, "linf": plan.linf * scale, "pipeline": False, "final_loss": final,
                     "poisons": len(plan.chosen), "negatives": args.negatives,
                     "harden": args.harden if kind else 0.0, "harden_kind": kind, "surrogate": surrogate,
                     "dropped": plan.drop_label(),
                     # What a poison changes: its own hardening (if any) and the pattern on top.
                     "stealth": change_metrics(poison_trigger.apply(hardened.images[plan.chosen]),
                                               plan.clean.images[plan.chosen]),
                     "readings": readings_of(plan, record.encoder)})
    return rows


def plan_for(args: argparse.Namespace, params: dict[str, Any], sets: tuple[ImageSet, ImageSet], trigger: Trigger,
             device: Any) -> Plan:
    """The run's `Plan` from the pipeline's params, sets and trigger: the poisons `--rate` picks (the seeded
    choice `cba poison` makes), the images `--drop` leaves out, and the test-time trigger at each `--test-scales`."""
    clean, test = sets
    settings = victim_settings(params)
    seed, target = settings["seed"], settings["target_class"]
    mode = pipeline_poison_mode(args.root)
    rate = float(params.get("poison_rate", 0.05)) if args.rate is None else args.rate
    chosen = choose_poison_indices(clean.labels, rate, target, mode, seed)
    dropped = dropped_images(clean.labels, chosen, args.drop, args.drop_from, target,
                             seed if args.drop_seed is None else args.drop_seed)
    triggered = [triggered_test_set(test, scaled_pattern(trigger.at_test_time(), t), target, seed).images
                 for t in args.test_scales]
    linf = float(trigger.params.get("linf", 0) or 0)
    return Plan(args, clean, test, chosen, dropped, triggered, settings, mode, rate, reader_options(params), linf,
                device)


def dropped_reference_row(plan: Plan, trigger: Trigger) -> dict[str, Any]:
    """A victim without poisons on the set a --drop run leaves: the pattern's own pull there."""
    record, final = train_victim(plan, without(plan.clean, plan.dropped), trigger, 0.0, "the smaller set's reference")
    return {"scale": 0.0, "linf": 0.0, "pipeline": False, "final_loss": final, "poisons": 0, "negatives": 0,
            "dropped": plan.drop_label(), "stealth": None, "readings": readings_of(plan, record.encoder)}


def title_of(args: argparse.Namespace) -> str:
    if args.drop:
        return "Victims that do not see some training images, read with the pipeline's test-time trigger"
    if args.harden:
        return "Poisons hardened against their own content, read with the pipeline's test-time trigger"
    return "The poisons at other amplitudes, read with the pipeline's test-time trigger"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    root = args.root
    missing = unfinished([root], (*pipeline_files(), POISON_RECORD))
    if missing:
        raise SystemExit(missing)
    params = pipeline_params(root)
    trigger = load_trigger(root / "data/trigger")
    # Every scaled trigger is built before any training, so a bad scale or a fixed trigger stops at once.
    poison_triggers = {s: scaled_pattern(trigger, s) for s in args.scales}
    clean, test = pipeline_sets(root)
    plan = plan_for(args, params, (clean, test), trigger, pick_device(args.device))
    seed, target, mode, linf = plan.settings["seed"], plan.settings["target_class"], plan.mode, plan.linf
    if args.negatives > int(np.sum(clean.labels != target)):
        raise SystemExit(f"--negatives {args.negatives}: more than the {int(np.sum(clean.labels != target))} "
                         "non-target training images")
    pipeline_rate = float(params.get("poison_rate", 0.05))
    pipeline_chosen = (plan.chosen if plan.rate == pipeline_rate
                       else choose_poison_indices(clean.labels, pipeline_rate, target, mode, seed))
    poisons = clean.images[pipeline_chosen]
    pipeline = read_pipeline_images(root, params, plan.triggered, ENCODERS, sets=(clean, test))
    reference = acc_and_asr(pipeline["reference"])
    rows = [{"scale": 1.0, "linf": linf, "pipeline": True, "final_loss": None, "poisons": len(poisons), "negatives": 0,
             "stealth": stealth_metrics(trigger, poisons),
             "readings": acc_and_asr(pipeline["poisoned"])}]
    kinds = args.harden_kind if args.harden else [None]
    # One surrogate for every fitted kind, trained (or loaded) before any of them.
    attacker = attacker_surrogate(plan, trigger) if any(kind not in (None, "random") for kind in kinds) else None
    surrogates = {}  # kind -> what the attacker's surrogate read of its poisons, for the fitted kinds
    for kind in kinds:
        hardened, surrogate = with_hardening(plan, kind, attacker)
        if surrogate:
            surrogates[kind] = surrogate
        rows += victim_rows(plan, hardened, poison_triggers, kind, surrogate)
    if args.drop_reference:
        rows.append(dropped_reference_row(plan, poison_triggers[args.scales[0]]))
    command, env = command_line(argv), environment(plan.device)
    data = (params.get("data") or {}).get("name", "synthetic")
    write_json(args.out, {"rows": rows, "reference": reference, "test_scales": args.test_scales,
                          "dropped": plan.dropped.tolist(),
                          "_run": {"command": command, "env": env, "trigger": trigger.name, "linf": linf,
                                   "target_class": target, "seed": seed, "poison_rate": plan.rate,
                                   "negatives": args.negatives, "drop": args.drop, "drop_from": args.drop_from,
                                   "drop_seed": args.drop_seed, "data": data}})
    text = table(rows, reference, args.test_scales, linf)
    args.out.with_suffix(".md").write_text(
        results_header(title_of(args), command, env)
        + f"Data: {data}; target {test.classes[target]}; seed {seed}; the pipeline poisons {pipeline_rate:g} of "
        f"the training set ({mode}).\n\n{text}\n{surrogate_lines(args.harden, surrogates)}")
    print(text)
    return {"rows": rows, "reference": reference}


if __name__ == "__main__":
    run_script(main)
