"""Loads a bench script (bench/ is scripts, not a package) as a module, for the tests that run one."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # As an import would: a dataclass (and anything else that looks its module up) finds the module there.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def refused(entry: Callable[[list[str]], Any], argv: list[str]) -> int:
    """Run a bench's `main` or `parse_args` on `argv` as its script runs it (`cba.errors.run_script`), expecting a
    refusal; returns the exit status (the one-line message is on stderr)."""
    from cba.errors import run_script

    try:
        run_script(lambda: entry(argv))
    except SystemExit as stop:
        return stop.code
    raise AssertionError(f"{argv} was not refused")
