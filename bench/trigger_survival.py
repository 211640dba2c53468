"""How much of each backdoor trigger survives the SSL augmentations (`cba.survival`).

Every registered trigger with its default parameters, plus two CTRL variants,
is stamped on test images (of the built-in synthetic data set, or `--data`); each
augmentation is then drawn once and applied with the same parameters to the
clean and the triggered image, and the residual is compared with the trigger
(definitions in `cba/survival.py`). Variants (also the keys of --asr-json):

- `ctrl`: CTRL's defaults, (15,15) and (31,31) on U and V;
- `ctrl_low8`: CTRL at the low frequency (8,8) on U and V;
- `ctrl_y`: CTRL's default frequencies on the Y (luminance) channel;
- every other registered trigger under its own name, except triggers that learn
  from data (`optimized`): their default pattern is unfitted, so they are
  measured only from a trigger saved in --optimized-dir by the trigger stage.

Columns: crop (RandomResizedCrop at min_scale), flip (p=1, in the pipeline 0.5),
brightness / contrast / saturation / hue (ColorJitter with one factor, p=1),
grayscale (p=1), ssl (cba's pipeline, per sample), ssl_per_batch (one draw per
batch), ssl_ctrl (CTRL's official code: per-sample geometry, jitter on or off
per batch).

    OMP_NUM_THREADS=1 python bench/trigger_survival.py                  # defaults, about a minute
    python bench/trigger_survival.py --test-size 64 --draws 1           # smoke run, seconds
    python bench/trigger_survival.py --data fashion_mnist --optimized-dir <a trigger fitted on it> \
        --out bench/results/trigger_survival_fashion.md                  # on real images
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
from pathlib import Path
from typing import Any

import yaml

from cba.data import DATASETS, load_dataset
from cba.errors import BenchParser, ConfigError, run_script
from cba.env import command_line, environment, where_it_ran
from cba.io import atomic_path, read_json, write_json
from cba.survival import DEFAULT_AUGMENTATIONS, MEASURES, survival_table
from cba.triggers import TRIGGERS, build_trigger, load_trigger

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
CTRL_VARIANTS = {"ctrl_low8": {"positions": [[8, 8]]}, "ctrl_y": {"channels": ["Y"]}}
ASR_KEYS = ("knn_asr", "linear_asr", "clean_asr")
TITLES = {
    "survival": "Survival: fraction of the test-time trigger a view carries, up to translation",
    "view_agreement": "View agreement: do two views of one triggered image share the trigger",
    "batch_agreement": "Batch agreement: do two triggered images of one batch carry the same trigger",
    "energy": "Energy kept: ||A(x') - A(x)||^2 / ||x' - x||^2",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = BenchParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--test-size", type=int, default=256, help="test images the triggers are stamped on")
    parser.add_argument("--data", default="synthetic", choices=DATASETS.names(),
                        help="the data set whose test images are used (a real one needs --root, or its default root)")
    parser.add_argument("--root", type=Path, default=None, help="folder of the data set's files (not for synthetic)")
    parser.add_argument("--draws", type=int, default=4, help="random draws of each augmentation (two views each)")
    parser.add_argument("--min-scale", type=float, default=None,
                        help="smallest crop area (default: pretrain.augmentation.min_scale in params.yaml)")
    parser.add_argument("--optimized-dir", type=Path, default=Path("data/trigger"),
                        help="folder of a saved trigger (trigger.json + trigger.safetensors) that learns from data")
    parser.add_argument("--asr-json", type=Path, nargs="+", default=None,
                        help="JSON {variant: {knn_asr, linear_asr, clean_asr}} merged in as extra columns "
                             "(several files: a variant in a later one replaces its figures from an earlier one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/trigger_survival.md"))
    args = parser.parse_args(argv)
    if args.test_size < 2 or args.draws < 1:
        parser.error("--test-size must be >= 2 and --draws >= 1")
    if args.min_scale is None:
        params = yaml.safe_load(PARAMS.read_text()) or {}
        args.min_scale = float(params["pretrain"]["augmentation"]["min_scale"])
    return args


def trigger_variants(args: argparse.Namespace, image_size: int) -> tuple[list[tuple[str, Any]], list[str]]:
    """(variant name, trigger or the error it raised) in table order, and notes on what was skipped."""
    variants: list[tuple[str, Any]] = []
    notes: list[str] = []

    def build(label: str, name: str, params: dict[str, Any]) -> None:
        try:
            variants.append((label, build_trigger(name, params, seed=args.seed, image_size=image_size)))
        except Exception as exc:  # reported in the table: one broken trigger must not hide the others
            variants.append((label, f"{type(exc).__name__}: {exc}"))

    for name in TRIGGERS.names():
        if getattr(TRIGGERS.get(name), "learns_from_data", False):
            continue
        build(name, name, {})
        if name == "ctrl":
            for label, params in CTRL_VARIANTS.items():
                build(label, "ctrl", params)
    saved = args.optimized_dir / "trigger.json"
    if saved.exists():
        try:
            trigger = load_trigger(args.optimized_dir)
            variants.append((trigger.name, trigger))
        except Exception as exc:
            variants.append(("optimized", f"{type(exc).__name__}: {exc}"))
    else:
        notes.append(f"optimized: skipped, no saved trigger in {args.optimized_dir} (run the trigger stage first)")
    return variants, notes


def load_asr(paths: list[Path] | None) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The per-variant ASR figures of every file, in order, and the column keys to show, known keys first."""
    figures: dict[str, dict[str, Any]] = {}
    for path in paths or []:
        found = read_json(path)
        if isinstance(found, dict):  # keys starting with "_" hold run details, not a variant
            found = {k: {key: v for key, v in entry.items() if key != "seconds"} if isinstance(entry, dict) else entry
                     for k, entry in found.items() if not k.startswith("_")}
        if not isinstance(found, dict) or not all(isinstance(v, dict) for v in found.values()):
            raise SystemExit(f"--asr-json {path}: expected {{variant: {{knn_asr: ..., ...}}}}")
        figures.update(found)
    if not figures:
        return {}, []
    present = {key for entry in figures.values() for key in entry}
    keys = [k for k in ASR_KEYS if k in present] + sorted(present - set(ASR_KEYS))
    return figures, keys


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.3f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def markdown_table(rows: list[dict[str, Any]], measure: str, variants: list[str],
                   asr: dict[str, dict[str, Any]], asr_keys: list[str]) -> str:
    """Rows = trigger variant, columns = augmentations (then the ASR figures), cell = `measure`."""
    cells = {(r["trigger"], r["augmentation"]): r[measure] for r in rows}
    header = ["trigger", *DEFAULT_AUGMENTATIONS, *asr_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in variants:
        values = [_fmt(cells.get((variant, aug))) for aug in DEFAULT_AUGMENTATIONS]
        values += [_fmt(asr.get(variant, {}).get(key)) for key in asr_keys]
        lines.append("| " + " | ".join([variant, *values]) + " |")
    return "\n".join(lines)


def tables(rows: list[dict[str, Any]], variants: list[str], asr: dict, asr_keys: list[str]) -> str:
    blocks = []
    for measure in MEASURES:
        blocks += [f"## {TITLES[measure]}", "", markdown_table(rows, measure, variants, asr, asr_keys), ""]
    return "\n".join(blocks)


def plain_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The command's settings as JSON values: paths, alone or in lists, become strings."""
    def plain(value: Any) -> Any:
        return [plain(v) for v in value] if isinstance(value, list) else str(value) if isinstance(value, Path) else value
    return {k: plain(v) for k, v in vars(args).items()}


def report(body: str, args: argparse.Namespace, command: str, notes: list[str]) -> str:
    env = environment("cpu")
    settings = plain_settings(args)
    return "\n".join([
        "# Trigger survival under the SSL augmentations",
        "",
        f"Command: `{command}`",
        "",
        f"Run {dt.datetime.now().isoformat(timespec='seconds')} on {where_it_ran(env)}; data: the {args.data} test split ({args.test_size} images).",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items())),
        "",
        body,
        "How to read: 1 = the view carries the whole test-time trigger (up to a shift). The max over 1024 "
        "shifts has a chance floor: ~0.05-0.07 for white noise, higher for narrow-band patterns such as "
        "CTRL's. Survival is signed: a view carrying -d scores low. Agreements are "
        "cosines, scale-free: read them with energy. Per-image measures have the same expectation per sample "
        "and per batch; only batch agreement tells the protocols apart. Per-batch rows rest on --draws "
        "parameter draws only, so they are noisier. Definitions: cba/survival.py.",
        "",
        *[f"- {note}" for note in notes],
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = command_line(argv)
    try:  # a missing or corrupt data set stops here, in one line, before anything is measured
        test = load_dataset(args.data, "test", root=None if args.root is None else str(args.root), seed=args.seed,
                            test_size=args.test_size)
    except (ConfigError, OSError, ValueError) as exc:
        raise SystemExit(f"trigger_survival: --data {args.data} --root {args.root}: {exc}") from None
    asr, asr_keys = load_asr(args.asr_json)
    variants, notes = trigger_variants(args, test.images.shape[1])
    print(f"trigger_survival: {len(variants)} triggers on {len(test)} {args.data} test images, "
          f"min_scale {args.min_scale:g}, {args.draws} draws", flush=True)
    rows: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    for label, trigger in variants:
        if isinstance(trigger, str):
            errors[label] = trigger
            continue
        try:
            found = survival_table(trigger, test.images, args.min_scale, args.seed, args.draws, label=label)
        except Exception as exc:  # one failing trigger is reported, the others still measured
            errors[label] = f"{type(exc).__name__}: {exc}"
            continue
        rows += found
        skipped = found[0]["skipped"]
        if skipped:
            notes.append(f"{label}: {skipped} of {len(test)} images skipped, the trigger changed nothing in them")
        print(f"  {label}: survival " + ", ".join(f"{r['augmentation']} {_fmt(r['survival'])}" for r in found), flush=True)
    notes += [f"{label}: failed, {message}" for label, message in errors.items()]
    notes += [f"--asr-json names {name!r}, which is not a measured variant" for name in asr
              if name not in {label for label, _ in variants}]
    names = [label for label, trigger in variants if label not in errors]
    body = tables(rows, names, asr, asr_keys)
    with atomic_path(args.out) as tmp:
        tmp.write_text(report(body, args, command, notes))
    write_json(args.out.with_suffix(".json"), {
        "command": command, "environment": environment("cpu"),
        "settings": plain_settings(args),
        "augmentations": list(DEFAULT_AUGMENTATIONS), "variants": names, "rows": rows,
        "errors": errors, "notes": notes, "asr": asr})
    print()
    print(body)
    for note in notes:
        print(f"note: {note}")
    print(f"\nwritten {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    run_script(main)
