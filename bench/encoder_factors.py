"""What an encoder keeps of the built-in images' generative factors: which shortcut met its loss.

`bench/method_learning.py` found methods (BYOL, SimSiam) whose encoders learn little of the class at the
pipeline's budget although their weights move and their loss falls. A loss met without the class is met
with something else, and on the built-in data every image is drawn from known factors: the shape's place,
size, rotation and colour, the background's colours and the direction of its ramp
(`cba.data.synthetic.FACTORS`). This bench reads each factor linearly out of frozen features
(`cba.analysis.factors`: a ridge fitted on `--fit-size` training images, R² on the whole test set), beside
the pipeline's kNN ACC (a bank of the same training images) and the features' effective rank (how many
directions they use), for

- `raw pixels` and `random init` (the pipeline's initial encoder): what any reader gets for free;
- one clean encoder per `--methods` entry, trained with the pipeline's recipe from params.yaml and no
  poisons (`cba.attack.run_attack` at poison rate 0; `--cache` keeps them between runs);
- every `--encoder LABEL=PATH` (an `encoder.safetensors` that cba wrote, e.g. the pipeline's victim).

With `--trigger` (a saved trigger folder) it also reads what the trigger does to each factor's reading on
the non-target test images: the mean change of the prediction in units of the factor's spread, so that a
pattern which the encoder reads as, say, a darker background or a shape moved left shows as such; the
same change within each true class, for the factor it moves most; and the ASR of that reader, by kNN and
by a linear probe (the pipeline's converged probe, fitted on the same training images).

With `--rescale S ...` it redraws the non-target test images with every shape's radius times S and all else
the same (`cba.data.synthetic.generate_with_factors`), and reads them as it reads the triggered ones: how
far a real change of size moves the size reading, and how often each reader then calls the target. A
trigger that works by looking like a larger shape would send images to the target as a real enlargement
that moves the reading as far does.

    OMP_NUM_THREADS=2 python bench/encoder_factors.py --methods simclr byol simsiam \\
        --encoder victim=data/pretrain/encoder.safetensors --trigger data/trigger   # about ten minutes on two cores

Only the built-in data set (`data.name: synthetic`) has factors. Writes `--out` (markdown) and the same
path with `.json`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cba.analysis.factors import READ_FACTORS, CleanSpread, effective_rank, factor_readout, factor_targets
from cba.attack import initial_backbone, params_splits, reader_options, run_attack, victim_settings
from cba.data.synthetic import load_with_factors
from cba.env import command_line, environment, results_header
from cba.errors import BenchParser, ConfigError, run_script
from cba.evaluate import (accuracy, attack_success_rate, feature_readers, fit_linear_probe, knn_predict,
                          pick_device, probe_predict)
from cba.io import write_json
from cba.models.io import load_encoder, named_encoder_paths
from cba.params_file import add_params_options, params_from_args
from cba.poison import triggered_test_set
from cba.ssl import METHODS
from cba.triggers import Trigger, build_trigger, load_trigger

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = BenchParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_params_options(parser, REPO / "params.yaml", help="the data set, seed, target class and victim recipe")
    parser.add_argument("--methods", nargs="*", default=["simclr", "byol", "simsiam"],
                        help="train a clean encoder of each with the pipeline's recipe; of "
                        f"{', '.join(METHODS.names())}")
    parser.add_argument("--encoder", action="append", default=[], metavar="LABEL=PATH",
                        help="a trained encoder to read beside them (repeatable)")
    parser.add_argument("--trigger", type=Path, default=None,
                        help="a saved trigger folder (as `cba trigger` writes it): read what it does to each factor")
    parser.add_argument("--rescale", type=float, nargs="*", default=[], metavar="S",
                        help="also read the test images redrawn with every shape's radius times S (0 < S <= 2)")
    parser.add_argument("--fit-size", type=int, default=5000, help="training images the readouts and the kNN bank use")
    parser.add_argument("--cache", type=Path, default=None,
                        help="a folder of trained victims to reuse (cba.victim_cache)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--out", type=Path, default=Path("bench/results/encoder_factors.md"))
    args = parser.parse_args(argv)
    args.pipeline = params_from_args(args, parser)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods {' '.join(unknown)}: choose from {', '.join(METHODS.names())}")
    name = (args.pipeline.get("data") or {}).get("name", "synthetic")
    if name != "synthetic":
        parser.error(f"data.name {name!r}: only the built-in data set (synthetic) has generative factors")
    bad = [scale for scale in args.rescale if not 0 < scale <= 2]
    if bad:
        parser.error(f"--rescale {bad[0]}: a radius scale in (0, 2]")
    if args.fit_size < 10:
        parser.error(f"--fit-size {args.fit_size}: at least 10 images are needed")
    return args


def split_factors(params: dict[str, Any], split: str, images: np.ndarray) -> dict[str, np.ndarray]:
    """The factors of `split`'s images, checked to belong to the very images the pipeline loads."""
    data = params.get("data") or {}
    drawn, factors = load_with_factors(split, seed=int(params.get("seed", 0)), **(data.get("options") or {}))
    if not np.array_equal(drawn.images, images):
        raise SystemExit(f"the {split} images differ from the factors' draw: data.options must be synthetic's own")
    return factors


def rescaled_test_images(params: dict[str, Any], scale: float, test_labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The test images `keep` selects, redrawn with every shape's radius times `scale` and all else the same."""
    data = params.get("data") or {}
    redrawn, _ = load_with_factors("test", seed=int(params.get("seed", 0)), radius_scale=scale,
                                   **(data.get("options") or {}))
    assert np.array_equal(redrawn.labels, test_labels)  # the same draws: only the shapes' size differs
    return redrawn.images[keep]


def clean_encoder(method: str, params: dict[str, Any], train_set, test, trigger: Trigger, device: torch.device,
                  cache: Path | None) -> tuple[torch.nn.Module, float]:
    """The encoder `cba pretrain` would train with `method` and no poisons (the trigger only marks its test
    set), and its last epoch's mean loss, which must be finite for its readings to mean anything."""
    record = run_attack(train_set, test, trigger, mode="clean_label", poison_rate=0.0, cache=cache, device=device,
                        **victim_settings(params, method))
    losses = record.losses
    loss = float(losses.loc[losses["epoch"] == losses["epoch"].max(), "loss"].mean())
    if not np.isfinite(loss):
        raise SystemExit(f"{method}: the clean encoder's final loss is {loss}; its readings would mean nothing")
    return record.encoder.eval(), loss


def split_move(clean: torch.Tensor, moved: torch.Tensor, direction: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each image's features rebuilt from `clean` with only the part of its move (`moved - clean`) along
    `direction` (`along`), and with the move less that part (`without`)."""
    unit = direction / direction.norm()
    move = moved - clean
    part = (move @ unit)[:, None] * unit
    return {"along": clean + part, "without": clean + move - part}


def read_encoder(label: str, extract: Callable[[np.ndarray], torch.Tensor], fit, test, targets, keep, triggered,
                 rescaled: dict[float, np.ndarray], target: int, options: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    fit_features, test_features, fit_labels = extract(fit.images), extract(test.images), torch.as_tensor(fit.labels)
    knn = lambda features: knn_predict(fit_features, fit_labels, features, test.num_classes,  # noqa: E731
                                       options["k"], options["temperature"])
    preds = knn(test_features)
    row: dict[str, Any] = {"reader": label, "knn_acc": accuracy(preds, test.labels), "dims": test_features.shape[1],
                           "effective_rank": effective_rank(test_features.numpy().astype(np.float64))}
    if triggered is not None or rescaled:
        spread = CleanSpread(fit_features.numpy())  # once per reader: an SVD of the fit features
        probe = fit_linear_probe(fit_features, fit_labels, test.num_classes, seed=options["seed"],
                                 **options["probe_options"]).probe
        calls = {"knn": knn, "probe": lambda features: probe_predict(probe, features)}
        row["natural"] = {name: attack_success_rate(call(test_features[keep]), target) for name, call in calls.items()}
    triggered_features = None
    if triggered is not None:
        triggered_features = extract(triggered.images)
        hits = calls["knn"](triggered_features)
        row["knn_asr"] = attack_success_rate(hits, target)
        row["probe_asr"] = attack_success_rate(calls["probe"](triggered_features), target)
        row["_hits"] = hits.numpy() == target
        triggered_features = triggered_features.numpy()
        row["whitened_move"] = spread.length((triggered_features - test_features[keep].numpy()).mean(0))
    row["factors"] = factor_readout(fit_features.numpy(), targets["fit"], test_features.numpy(), targets["test"],
                                    triggered_features, keep, test.labels[keep])
    enlarged = {scale: extract(images) for scale, images in rescaled.items()}
    if rescaled:
        # One size readout for every scale: the redrawn sets stacked, each scale a group of its own.
        size = factor_readout(fit_features.numpy(), {"size": targets["fit"]["size"]}, test_features.numpy(),
                              {"size": targets["test"]["size"]}, torch.cat(list(enlarged.values())).numpy(),
                              np.tile(keep, len(rescaled)), np.repeat(np.arange(len(rescaled)), len(keep)))["size"]
    row["rescaled"] = [{"scale": scale, "size_shift": size["shift_by_group"][index][0],
                        "whitened_move": spread.length((features - test_features[keep]).mean(0).numpy()),
                        **{f"{name}_target": attack_success_rate(call(features), target)
                           for name, call in calls.items()}}
                       for index, (scale, features) in enumerate(enlarged.items())]
    if triggered is not None and rescaled:
        # The trigger's move split along the direction the largest enlargement moves the features, on average:
        # which part of it do the readers call the target for?
        clean = test_features[keep]
        parts = split_move(clean, torch.as_tensor(triggered_features), (enlarged[max(rescaled)] - clean).mean(0))
        row["trigger_split"] = {"scale": max(rescaled), **{
            part: {f"{name}_target": attack_success_rate(call(features), target) for name, call in calls.items()}
            for part, features in parts.items()}}
    row["seconds"] = time.perf_counter() - started
    readings = ", ".join(f"{name} {row['factors'][name]['r2']:.2f}" for name in READ_FACTORS)
    print(f"{label}: kNN ACC {row['knn_acc']:.3f}, effective rank {row['effective_rank']:.1f} of {row['dims']}, "
          f"R² {readings}", flush=True)
    return row


def most_moved(rows: list[dict[str, Any]]) -> str:
    """The factor whose reading the trigger moves most, on average over the readers."""
    return max(READ_FACTORS, key=lambda name: np.mean([np.linalg.norm(r["factors"][name]["shift"]) for r in rows]))


def tables(rows: list[dict[str, Any]], classes: list[str]) -> str:
    head = ("| features read | kNN ACC | effective rank (of dims) | "
            + " | ".join(f"R² {name}" for name in READ_FACTORS) + " |")
    lines = [head, "|---|---|---|" + "---|" * len(READ_FACTORS)]
    for r in rows:
        lines.append(f"| {r['reader']} | {r['knn_acc']:.3f} | {r['effective_rank']:.1f} ({r['dims']}) | "
                     + " | ".join(f"{r['factors'][name]['r2']:.2f}" for name in READ_FACTORS) + " |")
    if rows[0]["rescaled"]:
        lines += ["", rescale_table(rows)]
    if "knn_asr" not in rows[0]:
        return "\n".join(lines)
    lines += ["", "What the trigger does to each reading (non-target test images; mean change of the prediction "
              "over the factor's standard deviation, one figure per dimension):", "",
              "| features read | kNN ASR | probe ASR | " + " | ".join(READ_FACTORS) + " |",
              "|---|---|---|" + "---|" * len(READ_FACTORS)]
    for r in rows:
        lines.append(f"| {r['reader']} | {r['knn_asr']:.3f} | {r['probe_asr']:.3f} | " + " | ".join(
            ", ".join(f"{v:+.2f}" for v in r["factors"][name]["shift"]) for name in READ_FACTORS) + " |")
    moved = most_moved(rows)
    groups = sorted(rows[0]["factors"][moved]["shift_by_group"])
    lines += ["", f"The factor the trigger moves most, {moved}, by the images' true class (same units):", "",
              "| features read | " + " | ".join(classes[g] for g in groups) + " |", "|---|" + "---|" * len(groups)]
    for r in rows:
        lines.append(f"| {r['reader']} | " + " | ".join(
            ", ".join(f"{v:+.2f}" for v in r["factors"][moved]["shift_by_group"][g]) for g in groups) + " |")
    lines += ["", f"kNN target calls on triggered images by how far the trigger moves each image's {moved} reading "
              "(thirds of that reader's images, lowest first; mean move in brackets):", "",
              "| features read | first third | second third | last third |", "|---|---|---|---|"]
    for r in rows:
        cells = [f"{rate:.3f} ({move:+.2f})" for rate, move in r["by_move"]]
        lines.append(f"| {r['reader']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rescale_table(rows: list[dict[str, Any]]) -> str:
    """A real change of size beside the trigger: per reader, the size reading's change (in spreads) and the
    kNN / probe target calls on the non-target test images, clean, triggered and redrawn at each scale."""
    scales = [entry["scale"] for entry in rows[0]["rescaled"]]
    triggered = "knn_asr" in rows[0]
    lines = ["A real change of size beside the trigger (non-target test images redrawn with every shape's radius "
             "times the scale, all else the same): the size reading's change in spreads; the mean feature move's "
             "length in the clean features' own units (`CleanSpread`); kNN / probe target calls.",
             "", "| features read | clean | " + ("trigger | " if triggered else "")
             + " | ".join(f"radius × {scale:g}" for scale in scales) + " |",
             "|---|---|" + ("---|" if triggered else "") + "---|" * len(scales)]
    for r in rows:
        cells = [f"0; 0; {r['natural']['knn']:.3f} / {r['natural']['probe']:.3f}"]
        if triggered:
            cells.append(f"{r['factors']['size']['shift'][0]:+.2f}; {r['whitened_move']:.2f}; "
                         f"{r['knn_asr']:.3f} / {r['probe_asr']:.3f}")
        cells += [f"{e['size_shift']:+.2f}; {e['whitened_move']:.2f}; {e['knn_target']:.3f} / {e['probe_target']:.3f}"
                  for e in r["rescaled"]]
        lines.append(f"| {r['reader']} | " + " | ".join(cells) + " |")
    if "trigger_split" in rows[0]:
        scale = rows[0]["trigger_split"]["scale"]
        lines += ["", f"The trigger's move split along the direction the radius × {scale:g} enlargement moves the "
                  "features (each image keeps only that part of its move, or all but it): "
                  "kNN / probe target calls.", "",
                  "| features read | the whole move | only the enlargement's direction | all but it |",
                  "|---|---|---|---|"]
        for r in rows:
            split = r["trigger_split"]
            lines.append(f"| {r['reader']} | {r['knn_asr']:.3f} / {r['probe_asr']:.3f} | " + " | ".join(
                f"{split[part]['knn_target']:.3f} / {split[part]['probe_target']:.3f}" for part in ("along", "without"))
                + " |")
    return "\n".join(lines)


def calls_by_move(hits: np.ndarray, along: np.ndarray, parts: int = 3) -> list[tuple[float, float]]:
    """(share of target calls, mean move) in each of `parts` equal slices of the images sorted by their move."""
    defined = np.flatnonzero(~np.isnan(along))
    ordered = defined[np.argsort(along[defined], kind="stable")]
    return [(float(hits[part].mean()), float(along[part].mean())) for part in np.array_split(ordered, parts)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = command_line(argv)
    encoders = named_encoder_paths(args.encoder)
    params = args.pipeline
    try:
        trigger = load_trigger(args.trigger) if args.trigger is not None else None
        loaded = {label: load_encoder(path).eval() for label, path in encoders.items()}
        train_set, test = params_splits(params)
    except (OSError, ConfigError) as exc:
        raise SystemExit(str(exc).splitlines()[0]) from None
    device = pick_device(args.device)
    options, settings = reader_options(params), victim_settings(params)
    target, image_size = settings["target_class"], train_set.images.shape[1]
    fit_rows = np.sort(np.random.default_rng(settings["seed"]).permutation(len(train_set))[: args.fit_size])
    fit = train_set.subset(fit_rows)
    train_targets = factor_targets(split_factors(params, "train", train_set.images), train_set.classes, image_size)
    targets = {"fit": {name: value[fit_rows] for name, value in train_targets.items()},
               "test": factor_targets(split_factors(params, "test", test.images), test.classes, image_size)}
    keep = np.flatnonzero(test.labels != target)
    triggered = triggered_test_set(test, trigger, target, options["seed"]) if trigger is not None else None
    marker = trigger or build_trigger("patch", {}, seed=settings["seed"], image_size=image_size)
    trained, final_losses = {}, {}
    for method in args.methods:
        started = time.perf_counter()
        encoder, final_losses[method] = clean_encoder(method, params, train_set, test, marker, device, args.cache)
        trained[f"{method}, clean"] = encoder
        print(f"{method}: trained in {time.perf_counter() - started:.0f} s, final loss {final_losses[method]:.3f}",
              flush=True)
    untrained = initial_backbone(settings["backbone"], settings["width"], settings["seed"]).eval()
    readers = feature_readers({"random init": untrained, **trained, **loaded})
    rescaled = {scale: rescaled_test_images(params, scale, test.labels, keep) for scale in args.rescale}
    rows = [read_encoder(label, extract, fit, test, targets, keep, triggered, rescaled, target, options)
            for label, extract in readers.items()]
    if triggered is not None:
        moved = most_moved(rows)
        for row in rows:  # the per-image arrays give way to their summary before the JSON
            row["by_move"] = calls_by_move(row.pop("_hits"), row["factors"][moved]["along"])
    for row in rows:
        for reading in row["factors"].values():
            reading.pop("along", None)
    data = params.get("data") or {}
    result = {"rows": rows, "_run": {
        "command": command, "env": environment(device), "recipe": settings,
        "data": {"name": data.get("name", "synthetic"), "options": data.get("options") or {}},
        "fit_size": len(fit_rows), "final_losses": final_losses, "target_class": target,
        "encoders": {k: str(v) for k, v in encoders.items()},
        "trigger": None if trigger is None else {"name": trigger.name, "params": trigger.params}}}
    write_json(args.out.with_suffix(".json"), result)
    args.out.write_text(
        results_header("What encoders keep of the images' generative factors", command, result["_run"]["env"])
        + f"Data: synthetic {result['_run']['data']['options']}; readouts and kNN bank on {len(fit_rows)} training "
        f"images, R² on the {len(test)} test images (orientation: shapes with a rotational symmetry only). "
        f"Clean encoders' final losses: {', '.join(f'{m} {v:.3f}' for m, v in final_losses.items()) or 'none'}.\n\n"
        + tables(rows, test.classes) + "\n")
    print(tables(rows, test.classes))
    return result


if __name__ == "__main__":
    run_script(main)
