"""The environment a run used, recorded beside its metrics."""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

import cba


def source_digest(root: Path | None = None, entries: Sequence[str] | None = None) -> str:
    """SHA-256 of the package's source (names and contents): every .py file under `root` (default: the
    installed `cba`), or only those of `entries`, files or folders relative to it."""
    root = root or Path(cba.__file__).parent
    paths = (sorted(root.rglob("*.py")) if entries is None else
             [path for entry in entries
              for path in (sorted((root / entry).rglob("*.py")) if (root / entry).is_dir() else [root / entry])])
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU's model name (what a throughput figure was measured on)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
              if line.startswith("model name")]
    return models[0] if models else platform.processor() or platform.machine()


def cpu_capability() -> str:
    """The vector instruction set torch's CPU kernels use here, or "unknown" where torch cannot say."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


# Variables that cap the instruction set of torch's own kernels, oneDNN's and MKL's. With all three at AVX2 an
# AVX-512 machine computes the float stream of an AVX2 one (docs/results.md, "Reproducing a figure").
KERNEL_OVERRIDES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def kernel_overrides() -> dict[str, str]:
    """The kernel-capping variables set in this process's environment (none on a plain run)."""
    return {name: os.environ[name] for name in KERNEL_OVERRIDES if os.environ.get(name)}


def environment(device: torch.device | str | None = None) -> dict[str, object]:
    device = torch.device(device) if device is not None else torch.device("cpu")
    info: dict[str, object] = {
        "cba": cba.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": device_name(device),
        # The instruction set torch's CPU kernels dispatch to (AVX2, AVX512, ...): float sums, and so every
        # trained figure, differ between machines that dispatch differently, even on one seed.
        "cpu_capability": cpu_capability(),
    }
    overrides = kernel_overrides()
    if overrides:  # recorded only when set, so a plain run's record is as before
        info["kernel_overrides"] = overrides
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def where_it_ran(env: dict[str, object]) -> str:
    """The machine part of `environment(...)` in words, for a results table's header: the device, and on a CPU
    the instruction set its kernels used, since figures trained on AVX2 and AVX-512 differ even on one seed."""
    if str(env.get("device", "cpu")).startswith("cuda"):
        where = f"{env.get('gpu') or env.get('device_name')} ({env.get('device')})"
    else:
        forced = " forced by " + ", ".join(f"{k}={v}" for k, v in env["kernel_overrides"].items()) \
            if env.get("kernel_overrides") else ""
        where = f"{env.get('device_name')} (cpu, {env.get('cpu_capability', 'unknown')} kernels{forced})"
    return f"{where}, torch {env.get('torch')}, {env.get('torch_threads')} threads"


def results_header(title: str, command: str, env: dict[str, object]) -> str:
    """The opening of a bench's results table: its title, the command that ran it and where it ran."""
    return f"# {title}\n\nCommand: `{command}`\n\nRun on {where_it_ran(env)}.\n\n"


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran this script, quoted for a shell: `argv` if a caller passed it, else the real one.

    Benches record it beside their figures, so that a table says how to rerun it."""
    return shlex.join([Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None else argv)])
