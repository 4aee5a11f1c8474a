"""Helpers shared by the corpus tests."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxattn.corpus import Document

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "shakespeare"


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_bytes(content.encode("utf-8"))
    return path


def docs_of(*texts: str) -> list[Document]:
    return [Document(name=f"d{i}.txt", text=t) for i, t in enumerate(texts)]


def unchecked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` without the test-time type-checking wrapper (the jaxtyping hook in tests/conftest.py).

    For tests that pass a wrongly typed argument on purpose, to see the function's own
    :class:`JaxattnError` (what a user gets; the hook is not installed outside the tests).
    """
    return inspect.unwrap(fn)
