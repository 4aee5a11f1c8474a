"""Errors raised by jaxattn.

Every error a user can cause with bad input is a :class:`JaxattnError`. The CLI
turns it into one line on stderr and exit status 2.
"""

from __future__ import annotations


class JaxattnError(ValueError):
    """Bad input or configuration; the message names the bad value."""


class MemoryBudgetError(JaxattnError):
    """A dense array would exceed the configured memory budget."""
