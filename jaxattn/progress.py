"""Progress bars for long steps (tqdm on stderr) and wall-time stage timers.

Bars are switched off for short or quiet runs, and when stderr is not a terminal
(``JAXATTN_PROGRESS=1`` forces them on; see :func:`progress_enabled`). A :class:`Timer` is
created by an entry point (the CLI, an example, a benchmark) and passed down by name as
``timer=``; library functions time their stages with :func:`stage`, which does nothing when no
timer is given.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress_enabled(requested: bool = True) -> bool:
    """True when a bar should be drawn.

    A bar needs all of: ``requested`` (``--no-progress`` turns it off), no ``JAXATTN_NO_PROGRESS``
    in the environment, and stderr a terminal, so that redirected logs hold no escape codes.
    ``JAXATTN_PROGRESS=1`` forces bars onto a non-terminal stderr; ``JAXATTN_PROGRESS=0`` turns them off.

    Args:
        requested: the caller's wish (False wins over everything).

    Returns:
        Whether to draw.
    """
    if not requested or os.environ.get("JAXATTN_NO_PROGRESS"):
        return False
    forced = os.environ.get("JAXATTN_PROGRESS", "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return False
    if forced in ("1", "true", "yes", "on"):
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty is not None and isatty())


def progress_iter(items: Iterable[T], *, desc: str, enabled: bool = True, total: int | None = None) -> Iterator[T]:
    """Iterates ``items`` with a tqdm bar on stderr when enabled."""
    if not progress_enabled(enabled):
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)


class Timer:
    """Wall time of named stages, accumulated over repeated entries.

    Attributes:
        seconds: ``{stage name: seconds}``.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Times the enclosed block under ``name`` (accumulating)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def stage(timer: Timer | None, name: str) -> contextlib.AbstractContextManager[None]:
    """``timer.stage(name)``, or a no-op context when ``timer`` is None.

    Args:
        timer: the run's timer, or None when nobody is timing.
        name: the stage name.

    Returns:
        A context manager.
    """
    return timer.stage(name) if timer is not None else contextlib.nullcontext()
