"""The :class:`Document`: one named text of a corpus (shared by every reader)."""

from __future__ import annotations

import dataclasses

__all__ = ["Document"]


@dataclasses.dataclass(frozen=True)
class Document:
    """One document of a corpus.

    Attributes:
        name: path relative to the root that was read (POSIX separators), or a
            label such as ``"json/__init__.py"`` for the built-in corpus.
        text: the decoded text.
    """

    name: str
    text: str
