"""One exception type for bad user input, printed as a single line by the CLI, and the type checks behind it."""

from __future__ import annotations

import argparse
import re
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, NoReturn

import numpy as np


class ConfigError(ValueError):
    """A parameter, path or file the user supplied is unusable.

    The message always names the key, the bad value and what is allowed, so the
    CLI can print it as one line without a traceback.
    """

    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is not valid: {allowed}")


@contextmanager
def in_section(section: str, keys: Iterable[str]) -> Iterator[None]:
    """Put `section.` in front of the key of a ConfigError raised inside, if the key is one of `keys`.

    The library names a parameter as its own function does (`linf`, `root`,
    `temperature`); only the caller knows where that parameter lives in a
    config file, so the caller (a stage) says so here. A key outside `keys`
    (a path, or a key already placed) passes through unchanged.
    """
    keys = frozenset(keys)
    try:
        yield
    except ConfigError as err:
        if err.key.split(".", 1)[0] in keys:
            raise ConfigError(f"{section}.{err.key}", err.value, err.allowed) from None
        raise


class BenchParser(argparse.ArgumentParser):
    """argparse for the bench scripts, refusing a bad argument in one line: `error()` raises SystemExit with
    the message (no usage block), which `run_script` prints as `error: <message>` with exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise SystemExit(f"{message} (see --help)")


def run_script(main: Callable[[], Any]) -> None:
    """A bench script's entry point: bad user input ends the run with one line on stderr and exit status 2, as
    it ends a stage, instead of a traceback. Bad input is a ConfigError, wherever it is found, or a SystemExit
    with a message (a bench's own check of its arguments, or `BenchParser.error`)."""
    try:
        main()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except SystemExit as stop:
        if not isinstance(stop.code, str):
            raise  # --help, or an exit status the bench chose
        print(f"error: {stop.code}", file=sys.stderr)
        raise SystemExit(2) from None


def is_int(value: Any) -> bool:
    """An integer, but not a bool (YAML's true/false are ints to Python)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float, but not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and bool(np.isfinite(value))


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def is_device(value: object) -> bool:
    """Whether `value` names a device every `device` option takes: auto, cpu, cuda or cuda:N."""
    return isinstance(value, str) and (value in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", value) is not None)
