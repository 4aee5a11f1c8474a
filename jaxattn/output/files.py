"""Writing files: the output directory, atomic writes and the one JSON conversion.

Every file is written atomically (temporary file, then rename), so an interrupted run
never leaves a partial file that looks complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from jaxattn.errors import JaxattnError

__all__ = ["atomic_open", "ensure_out_dir", "jsonable", "write_json"]


def ensure_out_dir(out: str | os.PathLike[str]) -> Path:
    """Creates ``out`` (and parents) and checks it is writable.

    Args:
        out: the output directory.

    Returns:
        ``out`` as a :class:`~pathlib.Path`.

    Raises:
        JaxattnError: the directory cannot be created or written.
    """
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise JaxattnError(f"cannot create output directory {str(path)!r}: {e.strerror or e}") from e
    if not path.is_dir():
        raise JaxattnError(f"output path {str(path)!r} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise JaxattnError(f"output directory {str(path)!r} is not writable")
    return path


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Opens a temporary file beside ``path`` and renames it over ``path`` on success.

    On any exception (KeyboardInterrupt included) the temporary file is removed and ``path``
    is left as it was: an interrupted run never leaves a partial file under the final name.

    Args:
        path: the final file name.
        mode: ``"w"`` (text) or ``"wb"`` (binary).

    Yields:
        The open temporary file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Writes ``jsonable(obj)`` as JSON, atomically (strict JSON: no NaN or Infinity tokens).

    Args:
        path: the file to write.
        obj: the object (see :func:`jsonable`).

    Returns:
        None.
    """
    with atomic_open(path, "w") as f:
        json.dump(jsonable(obj), f, indent=1, allow_nan=False)
        f.write("\n")


def jsonable(obj: Any, *, strict: bool = False, depth: int = 0) -> Any:
    """A JSON-able copy of ``obj``: the one conversion every JSON file jaxattn writes goes through.

    Dicts (keys to ``str``), lists and tuples recurse; dataclasses become dicts; numpy scalars
    and arrays become Python numbers and lists; a non-finite float becomes None (JSON has no
    NaN). Anything else, or anything nested deeper than 12 levels, becomes its ``repr`` -- or,
    with ``strict``, is left as it is, so that ``json.dump`` refuses it (saved artefacts'
    metadata must round-trip, not degrade to a string).

    Args:
        obj: the object.
        strict: leave objects JSON cannot hold unconverted instead of writing their ``repr``.
        depth: the nesting depth so far (internal).

    Returns:
        An object ``json.dump`` accepts with ``allow_nan=False`` (unless ``strict`` kept one it does not).
    """
    if depth > 12:
        return obj if strict else repr(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj), strict=strict, depth=depth + 1)
    if isinstance(obj, dict):
        return {str(k): jsonable(v, strict=strict, depth=depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, strict=strict, depth=depth + 1) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, (str, bool, int)) or obj is None:
        return obj
    if hasattr(obj, "__array__"):
        return jsonable(np.asarray(obj).tolist(), strict=strict, depth=depth + 1)
    return obj if strict else repr(obj)
