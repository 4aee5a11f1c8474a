"""Progress bars for long steps (tqdm on stderr), switched off for short or quiet runs."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress_enabled(requested: bool = True) -> bool:
    """True when a bar should be drawn: requested, and not silenced by ``JAXATTN_NO_PROGRESS``."""
    return bool(requested) and not os.environ.get("JAXATTN_NO_PROGRESS")


def progress_iter(items: Iterable[T], *, desc: str, enabled: bool = True, total: int | None = None) -> Iterator[T]:
    """Iterates ``items`` with a tqdm bar on stderr when enabled."""
    if not progress_enabled(enabled):
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)
