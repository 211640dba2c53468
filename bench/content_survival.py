"""What a view keeps of the image's own shape, at each crop scale (`cba.survival.content_kept`).

The survival study (`bench/trigger_survival.py`) asks how much of a trigger the augmentations leave in a
view. This bench asks the same of the content the trigger has to be tied to. A clean-label poison is a
target image with the pattern on it; contrastive learning aligns its two views. Where both views show the
target's shape, the pattern only co-occurs with it. Where one view shows the pattern on little of the
shape and the other the shape, aligning the two asks the encoder to read the target off the pattern: the
pairs noisy alignment builds on purpose. How often the victim's own crop makes such pairs is a property
of the crop and the images alone, measured here on the built-in data, whose generator records every
shape (`cba.data.synthetic.shape_masks`).

For each crop scale, on the training split's target-class images and on all of them: the mean share of
the shape a view keeps, the share of views keeping less than half (and less than 0.3) of it, and the
share of two-view pairs in which exactly one view does.

    OMP_NUM_THREADS=2 python bench/content_survival.py     # seconds
    python bench/content_survival.py --min-scales 0.5 0.2 0.08 --draws 25 --out bench/results/content_survival.md
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from cba.data.synthetic import CLASSES, load_with_factors, shape_masks
from cba.env import command_line, environment, results_header
from cba.errors import BenchParser, run_script
from cba.io import atomic_path, write_json
from cba.params_file import add_params_options, params_from_args
from cba.survival import content_kept, content_summary

REPO = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.5, 0.3)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict[str, Any]]:
    parser = BenchParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_params_options(parser, REPO / "params.yaml")
    parser.add_argument("--min-scales", type=float, nargs="+", default=[0.5, 0.2, 0.08],
                        help="smallest crop areas to measure (0.5: the pipeline's; 0.2: CTRL's; 0.08: SimCLR's)")
    parser.add_argument("--draws", type=int, default=25, help="random draws of the crop per image (two views each)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/content_survival.md"))
    args = parser.parse_args(argv)
    params = params_from_args(args, parser)
    data = params.get("data") or {}
    if data.get("name", "synthetic") != "synthetic":
        parser.error(f"data.name={data.get('name')!r}: only the built-in data set (synthetic) records its shapes")
    bad = [s for s in args.min_scales if not 0 < s <= 1]
    if bad:
        parser.error(f"--min-scales {bad[0]}: a crop's smallest area must be in (0, 1]")
    if args.draws < 1:
        parser.error(f"--draws {args.draws}: must be at least 1")
    return args, params


def measure_rows(params: dict[str, Any], min_scales: list[float], draws: int) -> list[dict[str, Any]]:
    """One row per crop scale and image group (the target class, then every class)."""
    seed, target = int(params.get("seed", 0)), int(params.get("target_class", 0))
    options = (params.get("data") or {}).get("options") or {}
    _, factors = load_with_factors("train", seed=seed, **options)
    masks = shape_masks(factors["label"], factors["theta"], factors["radius"], factors["centre"])
    groups = {f"{CLASSES[target]} (the target)": factors["label"] == target,
              "every class": np.ones(len(masks), dtype=bool)}
    rows = []
    for min_scale in min_scales:
        for group, chosen in groups.items():
            kept = content_kept(masks[chosen], min_scale, draws=draws, seed=seed)
            summaries = {threshold: content_summary(kept, threshold) for threshold in THRESHOLDS}
            rows.append({"min_scale": min_scale, "images": group, "count": int(chosen.sum()),
                         "content_kept": summaries[THRESHOLDS[0]]["content_kept"],
                         **{f"{key}_{t:g}": summaries[t][key]
                            for t in THRESHOLDS for key in ("views_below", "split_pairs")}})
    return rows


def markdown(rows: list[dict[str, Any]], command: str, env: dict[str, Any], draws: int) -> str:
    header = ["crop's smallest area", "images", "shape a view keeps (mean)", "views keeping < 0.5",
              "pairs with exactly one such view", "views keeping < 0.3", "pairs with exactly one such view (0.3)"]
    lines = [results_header("What a view keeps of the image's shape", command, env).rstrip(), "",
             f"{draws} crop draws (two views each) per image; the crop is the victim's RandomResizedCrop "
             "(aspect ratio 3/4 to 4/3). Definitions: `cba/survival.py` (`content_kept`).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        values = [f"{row['min_scale']:g}", f"{row['images']} ({row['count']})", f"{row['content_kept']:.3f}"]
        values += [f"{row[f'{key}_{t:g}']:.4f}" for t in THRESHOLDS for key in ("views_below", "split_pairs")]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args, params = parse_args(argv)
    command, env = command_line(argv), environment("cpu")
    rows = measure_rows(params, args.min_scales, args.draws)
    text = markdown(rows, command, env, args.draws)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        tmp.write_text(text)
    write_json(args.out.with_suffix(".json"), {"command": command, "environment": env, "draws": args.draws,
                                               "rows": rows})
    print(text)
    return rows


if __name__ == "__main__":
    run_script(main)
