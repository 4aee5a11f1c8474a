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
import threading
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


def stage_lines_enabled(requested: bool = True) -> bool:
    """True when a :class:`Timer` should announce its long stages on stderr.

    Unlike bars, stage lines are plain text, so they are shown on a redirected stderr too; they
    are off when ``requested`` is False (``--no-progress``), with ``JAXATTN_NO_PROGRESS`` set, or
    with ``JAXATTN_PROGRESS=0``.
    """
    if not requested or os.environ.get("JAXATTN_NO_PROGRESS"):
        return False
    return os.environ.get("JAXATTN_PROGRESS", "").strip().lower() not in ("0", "false", "no", "off")


def progress_iter(items: Iterable[T], *, desc: str, enabled: bool = True, total: int | None = None) -> Iterator[T]:
    """Iterates ``items`` with a tqdm bar on stderr when enabled."""
    if not progress_enabled(enabled):
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)


class Timer:
    """Wall time of named stages, accumulated over repeated entries.

    With ``announce_after`` set, a stage still running after that many seconds prints
    ``jaxattn: STAGE ...`` on stderr, and ``jaxattn: STAGE done in X s`` when it ends, so that no
    long stage is silent (short stages print nothing).

    Attributes:
        seconds: ``{stage name: seconds}``.
    """

    def __init__(self, announce_after: float | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.announce_after = announce_after

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Times the enclosed block under ``name`` (accumulating)."""
        t0 = time.perf_counter()
        announced = threading.Event()
        alarm = None
        if self.announce_after is not None:

            def announce() -> None:
                announced.set()
                print(f"jaxattn: {name} ...", file=sys.stderr, flush=True)

            alarm = threading.Timer(self.announce_after, announce)
            alarm.daemon = True
            alarm.start()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            if alarm is not None:
                alarm.cancel()
                alarm.join()
                if announced.is_set():
                    print(f"jaxattn: {name} done in {dt:.1f} s", file=sys.stderr, flush=True)
            self.seconds[name] = self.seconds.get(name, 0.0) + dt


def stage(timer: Timer | None, name: str) -> contextlib.AbstractContextManager[None]:
    """``timer.stage(name)``, or a no-op context when ``timer`` is None.

    Args:
        timer: the run's timer, or None when nobody is timing.
        name: the stage name.

    Returns:
        A context manager.
    """
    return timer.stage(name) if timer is not None else contextlib.nullcontext()
