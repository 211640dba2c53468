"""Pretraining throughput: cba's on-device loop against the usual per-image DataLoader pipeline.

Measured in one run on one device, with the same model, method (SimCLR by default), loss and SGD:

- **cba**: the real `cba.train.train()`: uint8 images resident on the device, batched kornia augmentation
  there (`build_augment("ssl", 32, per_batch=False, min_scale=0.5)`), channels_last, bf16 autocast on CUDA;
  its epochs are timed by an `evaluate` hook that only reads the clock, after `--warmup-epochs` untimed ones.
  An instrumented copy of its step (the same calls: index the uint8 data, `.float().div_(255)`, augment the
  views, `method.loss`, `zero_grad`, `backward`, `step`) splits it into augmentation, forward+backward,
  optimizer (with the lr update) and other (loss read-back), synchronising CUDA around each section.
- **baseline**: the usual SSL code on torchvision: a `DataLoader` with `--workers` persistent processes
  (pinned memory on CUDA) whose Dataset augments each image on the CPU, two views each: RandomResizedCrop
  (scale 0.5..1, ratio 3/4..4/3, bilinear), flip p 0.5, colour jitter (0.4, 0.4, 0.4, 0.1) p 0.8 in random
  order, grayscale p 0.2, in plain torch (torchvision is not installed here). Batches go to the device per
  step. Its "aug" cell is the time a step waits for the loader: the per-image work the workers did not hide.

Both run the same batches (a permutation topped up to whole batches, as in train()). images/s = images
(two views each) processed per second over the timed epochs; **ratio = cba images/s / baseline images/s**
(above 1: cba is faster). train() always uses channels_last and bf16 on CUDA; so does the baseline's model
step unless `--no-channels-last` / `--no-bf16` (CUDA only) say otherwise, so that the ratio measures the data path; `--compile` compiles both backbones (a failure prints one line
and that pipeline runs eager).

    OMP_NUM_THREADS=2 python bench/throughput.py --images 2048 --batch-size 256 --epochs 2      # CPU
    python bench/throughput.py --images 50000 --backbone resnet18 --width 64 --batch-size 512 \\
        --device cuda --compile --workers 16                             # GPU

Writes `--out` (markdown) and the same stem with .json. bench/results/throughput.md holds the CPU
measurement, bench/results/throughput_resnet18_h100.md one H100 run of the GPU command at 20 000 images
without --compile.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cba.augment import build_augment
from cba.data import load_dataset
from cba.env import environment
from cba.errors import BenchParser, run_script
from cba.evaluate import pick_device
from cba.io import atomic_path, write_json
from cba.models import BACKBONES, build_backbone
from cba.ssl import METHODS, build_method
from cba.train import TrainConfig, epoch_batches, train

GRAY = (0.299, 0.587, 0.114)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = BenchParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default="simclr", choices=METHODS.names())
    p.add_argument("--backbone", default="convnet", choices=BACKBONES.names())
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--images", type=int, default=2048, help="built-in synthetic images (32x32)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs of each pipeline")
    p.add_argument("--warmup-epochs", type=int, default=1, help="untimed epochs before them")
    p.add_argument("--steps", type=int, default=None, help="timed steps of the breakdown (default: one epoch's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="baseline bf16 autocast (CUDA only)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="baseline model and inputs in channels_last, as cba's (default), so the ratio measures the data path")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone of both pipelines")
    p.add_argument("--workers", type=int, default=None, help="baseline DataLoader workers (default: 2 on CPU, 16 on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results/throughput.md"))
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    if min(args.images, args.batch_size, args.epochs, args.warmup_epochs, args.width) < 1 or (args.steps or 1) < 1:
        p.error("--images, --batch-size, --epochs, --warmup-epochs, --width and --steps must be >= 1")
    if (args.workers or 0) < 0:
        p.error("--workers must be >= 0")
    return args


# ---------------------------------------------------------------- the baseline's per-image CPU augmentation
def _gray(x: torch.Tensor) -> torch.Tensor:
    return (GRAY[0] * x[0] + GRAY[1] * x[1] + GRAY[2] * x[2]).unsqueeze(0)


def _blend(x: torch.Tensor, other: torch.Tensor | float, factor: float) -> torch.Tensor:
    return (factor * x + (1 - factor) * other).clamp_(0, 1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x
    maxc, minc = x.max(0).values, x.min(0).values
    same, span = maxc == minc, maxc - minc
    s = span / torch.where(same, torch.ones_like(maxc), maxc)
    span = torch.where(same, torch.ones_like(span), span)
    rc, gc, bc = (maxc - r) / span, (maxc - g) / span, (maxc - b) / span
    h = (maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2 + rc - bc) + ((maxc != g) & (maxc != r)) * (4 + gc - rc)
    return torch.stack([torch.fmod(h / 6 + 1, 1), s, maxc])


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x
    i = torch.floor(h * 6)
    f = h * 6 - i
    i = i.long() % 6
    p, q, t = (v * (1 - s)).clamp(0, 1), (v * (1 - s * f)).clamp(0, 1), (v * (1 - s * (1 - f))).clamp(0, 1)
    table = torch.stack([torch.stack(c) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))])  # (3, 6, H, W)
    return table.gather(1, i.expand(3, 1, *i.shape)).squeeze(1)


class PerImageAugment:
    """torchvision's SimCLR pipeline on one float (3, H, W) image in [0, 1], in plain torch ops."""

    def __init__(self, size=32, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), p_flip=0.5, jitter=(0.4, 0.4, 0.4, 0.1),
                 p_jitter=0.8, p_gray=0.2):
        self.size, self.scale, self.ratio, self.jitter = size, scale, ratio, jitter
        self.p_flip, self.p_jitter, self.p_gray = p_flip, p_jitter, p_gray

    @staticmethod
    def _u(low: float, high: float) -> float:
        return float(torch.empty(1).uniform_(low, high))

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """RandomResizedCrop.get_params: 10 tries at a random area and aspect, else a centre crop."""
        area, log_ratio = height * width, (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target, aspect = area * self._u(*self.scale), math.exp(self._u(*log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(torch.randint(0, height - h + 1, ())), int(torch.randint(0, width - w + 1, ())), h, w
        in_ratio = width / height
        w, h = (width, round(width / self.ratio[0])) if in_ratio < self.ratio[0] else (
            (round(height * self.ratio[1]), height) if in_ratio > self.ratio[1] else (width, height))
        return (height - h) // 2, (width - w) // 2, h, w

    def colour_jitter(self, x: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast, saturation and hue, in a random order as torchvision applies them."""
        for op in torch.randperm(4).tolist():
            amount = self.jitter[op]
            f = self._u(-amount, amount) if op == 3 else self._u(max(0.0, 1 - amount), 1 + amount)
            if op == 3:
                hsv = _rgb_to_hsv(x)
                hsv[0] = (hsv[0] + f) % 1.0
                x = _hsv_to_rgb(hsv)
            else:
                x = _blend(x, (0.0, _gray(x).mean(), _gray(x))[op], f)
        return x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        top, left, h, w = self.crop_box(x.shape[1], x.shape[2])
        x = x[:, top:top + h, left:left + w]
        if (h, w) != (self.size, self.size):
            x = F.interpolate(x[None], (self.size, self.size), mode="bilinear", align_corners=False)[0]
        if float(torch.rand(())) < self.p_flip:
            x = x.flip(-1)
        if float(torch.rand(())) < self.p_jitter:
            x = self.colour_jitter(x)
        if float(torch.rand(())) < self.p_gray:
            x = _gray(x).repeat(3, 1, 1)
        return x.contiguous()


class TwoViewDataset(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, views: int, augment: PerImageAugment):
        self.images, self.labels, self.views, self.augment = images, labels, views, augment  # images: uint8 (N, 3, H, W)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = self.images[i].float().div(255)  # ToTensor
        return (*(self.augment(x) for _ in range(self.views)), self.labels[i])


class TopUpBatches:
    """train()'s batches (cba.train.epoch_batches), a new permutation each epoch, as a batch sampler."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.gen = n, batch_size, torch.Generator().manual_seed(seed)

    def __iter__(self):
        return iter([b.tolist() for b in epoch_batches(self.n, self.batch_size, self.gen)])


# ---------------------------------------------------------------- timing
def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def sgd(method) -> torch.optim.Optimizer:
    """train()'s optimizer at TrainConfig's defaults (the lr is the method's; its schedule costs nothing here)."""
    config = TrainConfig()
    params = [p for p in method.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=method.default_lr, momentum=config.momentum, weight_decay=config.weight_decay)


def build(args, device, batch: int, channels_last: bool, amp: bool, label: str):
    """The method on the device, the same weights for both pipelines; with --compile, its backbone compiled and
    tried on one step: on any failure print why and keep it eager. Returns (method, compiled)."""
    torch.manual_seed(args.seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    method = build_method(args.method, build_backbone(args.backbone, width=args.width)).to(device).to(memory_format=fmt)
    if not args.compile:
        return method, False
    eager = method.backbone
    try:
        method.backbone = torch.compile(eager)
        views = [torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt) for _ in range(method.num_views)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = method.loss(views, torch.zeros(batch, dtype=torch.long, device=device))
        loss.backward()
        method.zero_grad(set_to_none=True)
        return method, True
    except Exception as exc:  # noqa: BLE001  (inductor raises many kinds)
        method.backbone = eager
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"--compile: torch.compile failed for the {label} backbone ({type(exc).__name__}: {first}); "
              "measuring it eager", flush=True)
        return method, False


def time_cba(args, images, labels, device, batch: int) -> tuple[dict, tuple]:
    method, compiled = build(args, device, batch, True, device.type == "cuda", "cba")
    stamps: list[float] = []

    def stamp(encoder, epoch: int) -> dict:  # train()'s evaluate hook, every epoch: it only reads the clock
        stamps.append(_clock(device))
        return {}

    augment = build_augment("ssl", 32, per_batch=False, min_scale=0.5)
    config = TrainConfig(epochs=args.warmup_epochs + args.epochs, batch_size=args.batch_size, lr=method.default_lr,
                         seed=args.seed, eval_every=1)
    train(method, images, labels, augment, config, device, evaluate=stamp, progress=not args.quiet)
    epochs = [b - a for a, b in zip(stamps[args.warmup_epochs - 1:], stamps[args.warmup_epochs:])]
    return {"epoch_s": epochs, "compiled": compiled}, (method, augment)


def breakdown(args, method, augment, images, labels, device, batch: int) -> dict[str, float]:
    """An instrumented copy of train()'s inner step, on the method train() left behind."""
    data = torch.as_tensor(images).permute(0, 3, 1, 2).contiguous().to(device)
    targets = torch.as_tensor(labels).long().to(device)
    opt = sgd(method)
    amp, gen = device.type == "cuda", torch.Generator().manual_seed(args.seed)
    steps = args.steps or math.ceil(len(images) / batch)
    parts = dict.fromkeys(("aug", "fwd_bwd", "optimizer", "other", "step"), 0.0)
    batches: list[torch.Tensor] = []
    for step in range(2 + steps):  # two warm-up steps
        batches = batches or epoch_batches(len(images), args.batch_size, gen)
        idx = batches.pop(0)
        t = [_clock(device)]  # t[k + 1] - t[k]: lr update, aug, forward, zero_grad, backward, step, loss read-back
        for group in opt.param_groups:
            group["lr"] = method.default_lr
        t.append(_clock(device))
        local = idx.to(device)
        x = data[local].float().div_(255)
        views = [augment(x).contiguous(memory_format=torch.channels_last) for _ in range(method.num_views)]
        t.append(_clock(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, per_sample = method.loss(views, targets[local])
        t.append(_clock(device))
        opt.zero_grad(set_to_none=True)
        t.append(_clock(device))
        loss.backward()
        t.append(_clock(device))
        opt.step()
        method.after_step(0.5)
        t.append(_clock(device))
        per_sample.float().cpu(), float(loss.detach())
        t.append(time.perf_counter())
        d = [(b - a) * 1000 / steps if step >= 2 else 0.0 for a, b in zip(t, t[1:])]
        for key, value in zip(parts, (d[1], d[2] + d[4], d[0] + d[3] + d[5], d[6], sum(d))):
            parts[key] += value
    return {f"{k}_ms": v for k, v in parts.items()} | {"steps": steps}


def time_baseline(args, images, labels, device, batch: int, workers: int) -> dict:
    cl, amp = args.channels_last, args.bf16 and device.type == "cuda"
    fmt = torch.channels_last if cl else torch.contiguous_format
    method, compiled = build(args, device, batch, cl, amp, "baseline")
    data = TwoViewDataset(torch.as_tensor(images).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(labels).long(),
                          method.num_views, PerImageAugment())
    loader = torch.utils.data.DataLoader(data, batch_sampler=TopUpBatches(len(images), args.batch_size, args.seed),
                                         num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    opt = sgd(method)
    method.train()
    epochs, waits = [], []
    for epoch in range(args.warmup_epochs + args.epochs):
        start = wait = _clock(device)
        waited = 0.0
        for *views, target in loader:
            waited += time.perf_counter() - wait
            views = [v.to(device, non_blocking=True).contiguous(memory_format=fmt) for v in views]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss, per_sample = method.loss(views, target.to(device, non_blocking=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            method.after_step(0.5)
            per_sample.float().cpu(), float(loss.detach())  # a sync, as in train()
            wait = time.perf_counter()
        seconds = _clock(device) - start
        if epoch >= args.warmup_epochs:
            epochs.append(seconds)
            waits.append(waited)
        if not args.quiet:
            print(f"baseline epoch {epoch + 1}: {seconds:.2f}s", file=sys.stderr, flush=True)
    del loader  # stops the persistent workers
    return {"epoch_s": epochs, "wait_s": waits, "compiled": compiled}


# ---------------------------------------------------------------- report
def markdown_table(rows: list[dict]) -> str:
    """One row per pipeline; each part of a step in ms and in % of the step it was timed in."""
    def part(b: dict, key: str) -> str:
        return f"{b[key]:.1f} ({100 * b[key] / b['step_ms']:.0f} %)" if key in b else "–"

    lines = ["| pipeline | images/s | s/epoch | ms/step | aug (baseline: loader wait) | fwd+bwd | optimizer | other |",
             "|---|---|---|---|---|---|---|---|"]
    return "\n".join(lines + [f"| {r['pipeline']} | {r['images_per_s']:.0f} | {r['s_per_epoch']:.2f} | {r['step_ms']:.1f} | "
                               + " | ".join(part(r["breakdown"], f"{k}_ms") for k in ("aug", "fwd_bwd", "optimizer", "other"))
                               + " |" for r in rows])


def report(result: dict) -> str:
    env, s = result["env"], result["settings"]
    return "\n\n".join([
        "# Pretraining throughput: cba's on-device loop vs a per-image DataLoader baseline",
        f"**{result['header']}**", f"Command: `{result['command']}`",
        f"Run {result['time']} on {env['device_name']} ({env['device']}), torch {env['torch']}, {env['torch_threads']} "
        f"threads, load average at start {env['load_avg_start']:.2f}; {s['method']} on {s['backbone']} width {s['width']}, "
        f"{s['images']} synthetic 32x32 images, batch {s['batch_size']}, {s['epochs']} timed epochs after "
        f"{s['warmup_epochs']} warm-up; baseline: {s['workers']} workers, bf16 {s['baseline_bf16']}, channels_last "
        f"{s['channels_last']}; compiled: cba {result['compiled']['cba']}, baseline {result['compiled']['baseline']}.",
        markdown_table(result["rows"]), f"**Ratio cba / baseline (images/s): {result['ratio']:.2f}x**",
        "Timed epochs (s): " + "; ".join(f"{r['pipeline']} " + ", ".join(f"{e:.2f}" for e in r["epoch_s"]) for r in result["rows"]),
        "ms/step: from the timed epochs. cba's parts come from an instrumented copy of its step "
        f"({result['rows'][0]['breakdown']['step_ms']:.1f} ms timed section by section), in % of that. Baseline's aug "
        "column is the time a step waits for the DataLoader"
        + ("; on a CPU its workers also share cores with the model step, so that column understates what the "
           "per-image work costs" if env["device"] == "cpu" else "") + ". GPU figures: "
        + ("this run." if env["device"].startswith("cuda") else "bench/results/throughput_resnet18_h100.md (an H100), "
           "from the second command in bench/throughput.py's docstring.")]) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    argv_used = list(sys.argv) if argv is None else [Path(sys.argv[0]).as_posix() if sys.argv else "bench/throughput.py", *argv]
    threads_env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
    command = " ".join([*(f"{k}={v}" for k, v in threads_env.items()), shlex.join(argv_used)])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    device = pick_device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device here")
        torch.backends.cudnn.benchmark = True
    workers = args.workers if args.workers is not None else (2 if device.type == "cpu" else 16)
    data = load_dataset("synthetic", "train", seed=args.seed, train_size=args.images, test_size=1)
    images, labels = data.images, data.labels
    batch = min(args.batch_size, len(images))
    steps = math.ceil(len(images) / batch)
    if not args.quiet:
        print(f"throughput: {args.method} on {args.backbone} width {args.width}, {len(images)} images, batch {batch}, "
              f"{device}, baseline with {workers} workers", flush=True)
    timed, (method, augment) = time_cba(args, images, labels, device, batch)
    parts = breakdown(args, method, augment, images, labels, device, batch)
    del method
    base = time_baseline(args, images, labels, device, batch, workers)
    rows = [{"pipeline": name, "s_per_epoch": sum(t["epoch_s"]) / len(t["epoch_s"]), "epoch_s": t["epoch_s"],
             "steps_per_epoch": steps, "images_per_epoch": steps * batch} for name, t in (("cba", timed), ("baseline", base))]
    for row in rows:
        row |= {"images_per_s": steps * batch / row["s_per_epoch"], "step_ms": row["s_per_epoch"] * 1000 / steps}
    rows[0]["breakdown"] = parts
    rows[1]["breakdown"] = {"aug_ms": sum(base["wait_s"]) / len(base["wait_s"]) * 1000 / steps, "step_ms": rows[1]["step_ms"],
                            "note": "aug_ms: the time a step waits for the DataLoader"}
    env = environment(device) | {"load_avg_start": load, "thread_env": threads_env}
    header = (f"GPU, {env['device_name']}" if device.type == "cuda" else
              f"CPU, {os.cpu_count()} cores{', shared' if load > 1 else ''}: rough figures")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings |= {"workers": workers, "baseline_bf16": args.bf16 and device.type == "cuda"}
    result = {"command": command, "argv": argv_used, "time": dt.datetime.now().isoformat(timespec="seconds"),
              "header": header, "env": env, "settings": settings, "rows": rows,
              "ratio": rows[0]["images_per_s"] / rows[1]["images_per_s"],
              "compiled": {"cba": timed["compiled"], "baseline": base["compiled"]}}
    with atomic_path(args.out) as tmp:
        tmp.write_text(report(result))
    write_json(args.out.with_suffix(".json"), result)
    print(markdown_table(rows))
    print(f"\nratio cba / baseline (images/s): {result['ratio']:.2f}x\nwritten {args.out} and {args.out.with_suffix('.json')}")
    return result


if __name__ == "__main__":
    run_script(main)
