"""Where jaxattn keeps its per-user caches (compiled kernels, the parsed built-in corpus)."""

from __future__ import annotations

import os

__all__ = ["cache_dir"]


def cache_dir(env_var: str, name: str) -> str | None:
    """A cache directory, or None when the user turned that cache off.

    ``env_var`` set to ``0`` (or ``off``, ``no``, ``false``, or empty) turns it off; any other value is
    the directory. By default ``$XDG_CACHE_HOME/jaxattn/<name>`` (``~/.cache/jaxattn/<name>``).

    Args:
        env_var: the environment variable that overrides it, e.g. ``JAXATTN_COMPILATION_CACHE``.
        name: the subdirectory of the default location, e.g. ``"jax"``.

    Returns:
        The directory (not created here), or None.
    """
    raw = os.environ.get(env_var)
    if raw is not None and raw.strip().lower() in ("", "0", "off", "no", "false"):
        return None
    if raw:
        return os.path.expanduser(raw)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxattn", name)
