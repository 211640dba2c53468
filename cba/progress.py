"""Progress bars that suit where they are shown.

On a terminal: tqdm's bar, redrawn in place. Anywhere else (a DVC log, CI, a
file): tqdm would still write a carriage return per redraw, which fills a log
with one unreadable line. There each update becomes a plain line, at most one
every `LOG_INTERVAL` seconds, plus the final one.
"""

from __future__ import annotations

import io
import sys
from typing import Any

from tqdm.auto import tqdm as _tqdm

LOG_INTERVAL = 30.0


class _LineWriter(io.TextIOBase):
    """Turns tqdm's in-place redraws into whole lines on the real stderr."""

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()


def is_terminal() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def tqdm(*args: Any, **kwargs: Any) -> _tqdm:
    """`tqdm.auto.tqdm` with the same arguments; plain, rate-limited lines when stderr is not a terminal."""
    if not is_terminal() and "file" not in kwargs:
        kwargs.update(file=_LineWriter(), mininterval=max(LOG_INTERVAL, kwargs.get("mininterval", 0.0)),
                      ascii=True, dynamic_ncols=False, ncols=200)
    return _tqdm(*args, **kwargs)
