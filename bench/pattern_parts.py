"""Which part of the learned pattern the backdoor reads: the pattern changed one way at a time, on both victims.

An additive pattern is its values, their signs, their colour and where they sit. Each variant below keeps
some of that and drops the rest; the poisoned victim and the reference victim (`cba reference`: no
poisons) read each one, the pipeline's way (`cba finetune`: the weighted kNN and the converged linear
probe, fitted once per encoder on its clean labelled set). What the backdoor needs is what, once dropped,
takes the poisoned reading down to the reference's:

- own: the learned pattern;
- negated: every sign flipped (the same layout and magnitudes);
- mirrored: flipped left to right, as the pretraining augmentation flips views;
- grayscale: each pixel's channel mean in every channel (no colour);
- spectrum: the pattern's amplitude spectrum with random phases, at its energy (its texture statistics,
  not its layout);
- shuffled: its pixels moved to random places (its values, not its layout);
- noise: random signs at the full budget (nothing of it);
- zoomed (3/4 and 1/2 of its area): its centre, enlarged to the whole image, as a crop-and-resize view of
  that area shows it (3/4: the mean view at `min_scale` 0.5; 1/2: the largest zoom);
- shifted: moved 4 pixels right and down (wrapped around), as a crop moves it.

The last three ask whether the backdoor is the pattern as the victim saw it through its augmented views,
which a reference victim, never shown it, might read less.

Every variant is clipped to the pattern's L-inf budget and added as the trigger adds it. Random variants
are seeded (`--seed`). Run on one or more repositories where `dvc repro finetune` has run:

    OMP_NUM_THREADS=2 python bench/pattern_parts.py --root . --root <another seed's repository>
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from cba.env import command_line, environment, results_header
from cba.errors import BenchParser, run_script
from cba.io import write_json
from cba.readings import (ENCODERS, asr_by_trigger, pipeline_files, pipeline_params, read_pipeline_triggers,
                          unfinished, victim_cells)
from cba.triggers import load_trigger
from cba.triggers.optimized import OptimizedTrigger

NEEDED = pipeline_files()


def spectrum(pattern: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The pattern's amplitude spectrum (per channel) with one random phase field for all channels, rescaled
    to the pattern's energy: the same texture statistics with the layout drawn anew."""
    amplitude = np.abs(np.fft.fft2(pattern, axes=(0, 1)))
    phase = np.angle(np.fft.fft2(rng.standard_normal(pattern.shape[:2])))[:, :, None]  # Hermitian: a real image
    drawn = np.real(np.fft.ifft2(amplitude * np.exp(1j * phase), axes=(0, 1)))
    return drawn * np.sqrt((pattern ** 2).mean() / max((drawn ** 2).mean(), 1e-12))


def zoomed(pattern: np.ndarray, area: float) -> np.ndarray:
    """The centred crop of `area` (a share of the pattern's), bilinearly resized to the pattern's size."""
    height, width, _ = pattern.shape
    rows, cols = round(height * area ** 0.5), round(width * area ** 0.5)
    top, left = (height - rows) // 2, (width - cols) // 2
    crop = torch.as_tensor(np.ascontiguousarray(pattern[top:top + rows, left:left + cols])).permute(2, 0, 1)[None]
    return F.interpolate(crop.float(), size=(height, width), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()


def variants(pattern: np.ndarray, linf: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 0x9A77])
    height, width, channels = pattern.shape
    made: dict[str, Callable[[], np.ndarray]] = {
        "own": lambda: pattern,
        "negated": lambda: -pattern,
        "mirrored": lambda: pattern[:, ::-1],
        "grayscale": lambda: np.repeat(pattern.mean(axis=2, keepdims=True), channels, axis=2),
        "spectrum": lambda: spectrum(pattern, rng),
        "shuffled": lambda: pattern.reshape(-1, channels)[rng.permutation(height * width)].reshape(pattern.shape),
        "noise": lambda: np.where(rng.random(pattern.shape) < 0.5, -linf, linf),
        "zoomed 3/4": lambda: zoomed(pattern, 0.75),
        "zoomed 1/2": lambda: zoomed(pattern, 0.5),
        "shifted": lambda: np.roll(pattern, (4, 4), axis=(0, 1)),
    }
    return {name: np.clip(make(), -linf, linf).astype(np.float32) for name, make in made.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = BenchParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", type=Path, action="append", default=None,
                        help="a repository where `dvc repro finetune` has run (repeat for several; default: .)")
    parser.add_argument("--seed", type=int, default=0, help="draws the random variants")
    parser.add_argument("--out", type=Path, default=Path("bench/results/pattern_parts.json"))
    args = parser.parse_args(argv)
    args.root = args.root or [Path(".")]
    refusal = unfinished(args.root, NEEDED)
    if refusal:
        parser.error(refusal)
    return args


def read_root(root: Path, seed: int) -> dict[str, Any]:
    """Both victims of one pipeline reading every variant of its pattern."""
    params = pipeline_params(root)
    run_seed, target = int(params.get("seed", 0)), int(params.get("target_class", 0))
    trigger = load_trigger(root / "data/trigger")
    if "pattern" not in trigger.tensors():
        raise SystemExit(f"--root {root}: trigger {trigger.name!r} is not an additive pattern; this bench reads "
                         "the learned one (optimized)")
    linf = float(trigger.params["linf"])
    made = variants(trigger.tensors()["pattern"].numpy(), linf, seed)
    readings = asr_by_trigger(read_pipeline_triggers(
        root, params, [OptimizedTrigger.from_pattern(p, linf) for p in made.values()], ENCODERS))
    rows = [{"variant": name, "rms": float(np.sqrt((made[name] ** 2).mean())), **readings[i]}
            for i, name in enumerate(made)]
    return {"root": str(root), "seed": run_seed, "poison_rate": float(params.get("poison_rate", 0.0)),
            "target_class": target, "rows": rows}


def table(result: dict[str, Any]) -> str:
    lines = [f"**seed {result['seed']}, poison rate {result['poison_rate']:g}** ({result['root']})", "",
             "| variant | RMS (0-255) | poisoned linear / kNN ASR | reference linear / kNN ASR | ratio linear / kNN |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['rms']:.1f} | {victim_cells(r['poisoned'], r['reference'], 1)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results = [read_root(root, args.seed) for root in args.root]
    command, env = command_line(argv), environment(torch.device("cpu"))
    write_json(args.out, {"roots": results, "_run": {"command": command, "env": env, "seed": args.seed}})
    text = "\n\n".join(table(result) for result in results)
    args.out.with_suffix(".md").write_text(
        results_header("Which part of the learned pattern the backdoor reads", command, env) + text + "\n")
    print(text)
    return {"roots": results}


if __name__ == "__main__":
    run_script(main)
