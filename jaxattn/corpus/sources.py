"""Reading text files, directories, globs and the built-in corpus into documents.

Sources (:func:`read_documents`):

* a text file (one document),
* a directory: every regular, non-hidden file below it, recursively, whose name
  ends in one of :data:`TEXT_EXTENSIONS` (``.txt``, ``.text``, any case), in sorted
  order, one document per file; other files (a ``SOURCE.md``, a ``README``) are
  skipped and one warning names them. To read other files, pass a glob instead
  (``"data/**/*.md"``; the CLI's ``--glob PATTERN`` does this for a directory:
  :func:`directory_glob`),
* a glob pattern such as ``"data/*_gut.txt"`` or ``"data/**/*.txt"``: every
  matching file, whatever its extension, sorted (a matching directory
  contributes its files under the directory rule),
* an explicit file path: that file, whatever its extension,
* ``None``: the built-in default corpus, the docstrings of Python's own standard
  library, parsed with :mod:`ast` at run time (:func:`default_documents`).

Text handling, chosen so that reading never raises on odd bytes:

* A file is *binary* when its first 8 KiB contain a NUL byte (the heuristic git
  uses), unless it starts with a UTF-16/UTF-32 byte-order mark. Binary files
  are skipped inside a directory or glob; a single binary file is an error.
* Bytes are decoded as UTF-8 (a leading BOM is dropped). Bytes that are not
  valid UTF-8 are replaced by U+FFFD (``errors="replace"``) and one warning
  says how many files were affected. Decoding never raises.
* Line endings are normalised to ``"\\n"`` (``"\\r\\n"`` and lone ``"\\r"``), as
  Python's text mode does.
* Empty files are skipped; if nothing is left the corpus is an error.
"""

from __future__ import annotations

import ast
import codecs
import dataclasses
import glob
import numbers
import os
import re
import sysconfig
import warnings
from collections.abc import Sequence

from jaxattn.errors import JaxattnError
from jaxattn.progress import progress_iter

__all__ = [
    "BINARY_SNIFF_BYTES",
    "BUILTIN_SOURCE",
    "PROGRESS_MIN_FILES",
    "TEXT_EXTENSIONS",
    "Document",
    "default_documents",
    "directory_glob",
    "read_documents",
]

BUILTIN_SOURCE = "builtin:stdlib-docstrings"
"""``Corpus.source`` of the built-in default corpus."""

BINARY_SNIFF_BYTES = 8192
"""A file whose first this many bytes hold a NUL byte is binary."""

PROGRESS_MIN_FILES = 16
"""Fewer files than this: no progress bar."""

TEXT_EXTENSIONS = (".txt", ".text")
"""A directory contributes the files whose name ends in one of these (case-insensitive)."""

_GLOB_MAGIC = re.compile(r"[*?\[]")
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"})
_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


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


# --------------------------------------------------------------------------- #
# Files, directories and globs
# --------------------------------------------------------------------------- #


def _show(path: str) -> str:
    return path if path else "''"


def _is_binary(head: bytes) -> bool:
    """NUL byte in the first 8 KiB, unless a UTF-16/32 byte-order mark says it is text."""
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return False
    return b"\x00" in head[:BINARY_SNIFF_BYTES]


def _decode(data: bytes) -> tuple[str, bool]:
    """Bytes -> (text, whether bytes had to be replaced). Never raises."""
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        enc = "utf-32"
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        enc = "utf-16"
    else:
        enc = "utf-8-sig"
    try:
        text, replaced = data.decode(enc), False
    except UnicodeDecodeError:
        text, replaced = data.decode(enc, errors="replace"), True
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text, replaced


def _read_file(path: str) -> bytes | None:
    """The file's bytes, or None when it looks binary (only its head is read)."""
    try:
        with open(path, "rb") as f:
            head = f.read(BINARY_SNIFF_BYTES)
            if _is_binary(head):
                return None
            return head + f.read()
    except OSError as e:
        raise JaxattnError(f"cannot read {path}: {e.strerror or e}") from None


def _walk_files(root: str, skipped: list[str]) -> list[str]:
    """Regular, non-hidden text-named files below ``root`` (symlinked directories are not followed).

    Files without a :data:`TEXT_EXTENSIONS` name are appended to ``skipped`` (relative to ``root``).
    """
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if fn.startswith("."):
                continue
            full = os.path.join(dirpath, fn)
            if not os.path.isfile(full):
                continue
            if fn.lower().endswith(TEXT_EXTENSIONS):
                out.append(full)
            else:
                skipped.append(_posix_rel(full, root))
    return out


def directory_glob(path: str, pattern: str) -> str:
    """The glob that reads the files of directory ``path`` whose base name matches ``pattern``.

    ``directory_glob("plays", "*.md")`` is ``"plays/**/*.md"``: every matching file
    below ``plays``, recursively, whatever its extension, named relative to ``plays``
    (as the directory rule names them).

    Args:
        path: a directory.
        pattern: a glob pattern for base names, such as ``"*.md"`` or ``"*_gut.*"``.

    Returns:
        A glob for :func:`read_documents`.

    Raises:
        JaxattnError: ``path`` is not a directory, or ``pattern`` is empty or holds a ``/``.
    """
    if not pattern or "/" in pattern or os.sep in pattern:
        raise JaxattnError(f"glob pattern {pattern!r} must be a non-empty base-name pattern such as '*.md'")
    if not os.path.isdir(os.path.expanduser(path)):
        raise JaxattnError(f"a glob pattern ({pattern!r}) needs a directory, got {_show(path)}")
    return os.path.join(path, "**", pattern)


def _glob_root(pattern: str) -> str:
    """The directory part of ``pattern`` before its first wildcard component."""
    head = []
    for part in pattern.split(os.sep):
        if _GLOB_MAGIC.search(part):
            break
        head.append(part)
    root = os.sep.join(head)
    if len(head) == len(pattern.split(os.sep)):  # no magic at all
        root = os.path.dirname(pattern)
    if pattern.startswith(os.sep) and not root:
        root = os.sep
    return root or "."


def _posix_rel(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def _skipped_note(skipped: list[str]) -> str:
    shown = ", ".join(skipped[:3]) + (f", ... ({len(skipped)} in all)" if len(skipped) > 3 else "")
    exts = " or ".join(f"*{e}" for e in TEXT_EXTENSIONS)
    return f"{len(skipped)} file(s) not named {exts} skipped: {shown}"


def _find_files(raw: str, skipped: list[str]) -> tuple[str, list[str], str]:
    """The files a path names: ``(root the names are relative to, files, mode)``.

    ``mode`` is ``"dir"``, ``"file"`` or ``"glob"``. Raises for a missing path, an
    empty directory, a glob that matches nothing, or something not a regular file.
    Files a directory holds but the extension rule leaves out go to ``skipped``.
    """
    p = os.path.expanduser(raw)
    if os.path.isdir(p):
        root, files, mode = p, _walk_files(p, skipped), "dir"
        if not files:
            more = f" ({_skipped_note(skipped)}; pass a glob such as DIR/**/*.md to read them)" if skipped else ""
            raise JaxattnError(f"no text files in directory: {raw}{more}")
    elif os.path.exists(p):
        if not os.path.isfile(p):
            raise JaxattnError(f"not a regular file or directory: {raw}")
        root, files, mode = os.path.dirname(p) or ".", [p], "file"
    elif p and _GLOB_MAGIC.search(p):
        root = _glob_root(p)
        files = []
        for m in glob.glob(p, recursive=True):
            if os.path.isdir(m):
                files.extend(_walk_files(m, skipped))
            elif os.path.isfile(m):
                files.append(m)
        files = list(dict.fromkeys(files))
        mode = "glob"
        if not files:
            raise JaxattnError(f"no files match: {raw}")
    else:
        raise JaxattnError(f"no such file or directory: {_show(raw)}")
    return root, files, mode


def _read_named_files(
    named: list[tuple[str, str]], raw: str, mode: str, progress: bool
) -> tuple[list[Document], list[str]]:
    """Reads ``(name, file)`` pairs: ``(documents, names of files whose bytes were replaced)``.

    Binary and empty files are skipped (a single binary file is an error); if no
    document is left the error says what was skipped.
    """
    docs: list[Document] = []
    n_binary = n_empty = 0
    replaced: list[str] = []
    show = progress and len(named) >= PROGRESS_MIN_FILES
    for name, f in progress_iter(named, desc="reading corpus", enabled=show, total=len(named)):
        data = _read_file(f)
        if data is None:
            if mode == "file":
                raise JaxattnError(f"not a text file (NUL bytes in its first 8 KiB): {raw}")
            n_binary += 1
            continue
        text, bad = _decode(data)
        if not text:
            n_empty += 1
            continue
        if bad:
            replaced.append(name)
        docs.append(Document(name=name, text=text))

    if not docs:
        if n_empty:
            skipped = f"; {n_binary} binary file(s) skipped" if n_binary else ""
            raise JaxattnError(f"corpus is empty: {raw} ({n_empty} empty file(s){skipped})")
        where = "in directory" if mode == "dir" else "match"
        raise JaxattnError(f"no text files {where}: {raw} ({n_binary} binary file(s) skipped)")
    return docs, replaced


def read_documents(path: str | os.PathLike[str] | None = None, *, progress: bool = True) -> list[Document]:
    """Reads a file, a directory or a glob into documents, one per file.

    Args:
        path: a text file (any name), a directory (its regular non-hidden files
            named ``*.txt`` or ``*.text``, recursively; a warning names the other
            files, which are skipped), a glob pattern (``**`` allowed; every
            matching file, any name), or None for the built-in default corpus
            (:func:`default_documents`). ``~`` is expanded.
        progress: show a progress bar on stderr (only with 16 files or more).

    Returns:
        The documents sorted by name; names are paths relative to the given
        directory (for a glob: to its directory part before the first wildcard;
        for a file: its base name). Empty files are left out.

    Raises:
        JaxattnError: no such path, a glob that matches nothing, no text files,
            a single file that is binary or not a regular file, or nothing but
            empty files ("corpus is empty: PATH").
    """
    if path is None:
        return default_documents(progress=progress)
    raw = os.fspath(path)
    if not isinstance(raw, str):
        raise JaxattnError(f"corpus path must be text, got {raw!r}")
    skipped: list[str] = []
    root, files, mode = _find_files(raw, skipped)
    named = sorted((_posix_rel(f, root), f) for f in files)
    docs, replaced = _read_named_files(named, raw, mode, progress)
    if skipped:
        warnings.warn(f"{raw}: {_skipped_note(sorted(skipped))}", stacklevel=2)
    if replaced:
        warnings.warn(
            f"{len(replaced)} file(s) in {raw} are not valid UTF-8 (first: {replaced[0]}); "
            "undecodable bytes were replaced by U+FFFD",
            stacklevel=2,
        )
    return docs


# --------------------------------------------------------------------------- #
# Built-in default corpus: the standard library's docstrings
# --------------------------------------------------------------------------- #


def _stdlib_files(root: str) -> list[tuple[str, str]]:
    """(relative POSIX path, full path) of the stdlib's ``.py`` files, sorted, test trees skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith(".")]
        for fn in filenames:
            if fn.endswith(".py") and not fn.startswith("."):
                full = os.path.join(dirpath, fn)
                out.append((_posix_rel(full, root), full))
    out.sort()
    return out


def _collect_docstrings(body: Sequence[ast.AST], out: list[str]) -> None:
    """Docstrings of the classes and functions in ``body``, in source order (depth first)."""
    for st in body:
        if isinstance(st, _DEFS):
            doc = ast.get_docstring(st)
            if doc:
                out.append(doc)
            _collect_docstrings(st.body, out)
        else:  # defs nested in if / try / with / for bodies
            for field in ("body", "orelse", "finalbody", "handlers"):
                sub = getattr(st, field, None)
                if isinstance(sub, list):
                    _collect_docstrings(sub, out)


def _module_docstrings(source: bytes) -> str | None:
    """All docstrings of one module joined by blank lines; None if it does not parse."""
    import gc

    gc_was_on = gc.isenabled()
    gc.disable()  # parsing allocates many objects; the cyclic GC only slows it down here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    finally:
        if gc_was_on:
            gc.enable()
    parts: list[str] = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(doc)
    _collect_docstrings(tree.body, parts)
    return "\n\n".join(parts)


_DEFAULT_CACHE: dict[tuple[str, int], tuple[Document, ...]] = {}


def _default_documents_cached(root: str, max_chars: int, progress: bool) -> tuple[Document, ...]:
    key = (root, max_chars)
    if key not in _DEFAULT_CACHE:
        if len(_DEFAULT_CACHE) >= 4:
            _DEFAULT_CACHE.clear()
        _DEFAULT_CACHE[key] = tuple(_default_documents_uncached(root, max_chars, progress))
    return _DEFAULT_CACHE[key]


def _default_documents_uncached(root: str, max_chars: int, progress: bool) -> list[Document]:
    if not os.path.isdir(root):
        raise JaxattnError(f"built-in corpus unavailable: no standard library sources at {root}; pass a corpus path")
    files = _stdlib_files(root)
    docs: list[Document] = []
    total = 0
    for name, full in progress_iter(files, desc="reading stdlib docstrings", enabled=progress, total=len(files)):
        if total >= max_chars:
            break
        try:
            with open(full, "rb") as f:
                source = f.read()
        except OSError:
            continue
        text = _module_docstrings(source)
        if not text:
            continue
        text = text[: max_chars - total]
        docs.append(Document(name=name, text=text))
        total += len(text)
    if not docs:
        raise JaxattnError(f"built-in corpus unavailable: no docstrings found under {root}; pass a corpus path")
    return docs


def default_documents(*, max_chars: int = 3_000_000, progress: bool = True) -> list[Document]:
    """The built-in default corpus: docstrings of Python's standard library.

    Walks ``sysconfig.get_paths()["stdlib"]`` in sorted relative-path order,
    parses each ``.py`` file with :mod:`ast` (nothing is imported), and makes
    one document per module holding its module, class and function docstrings
    (``ast.get_docstring``, cleaned) in source order, joined by blank lines.
    ``test``/``tests``/``idlelib``/``site-packages`` trees, files that do not
    parse and modules without docstrings are skipped. Reading stops once
    ``max_chars`` characters are collected (the last document is cut).

    The result depends only on the Python installation (CPython 3.11 gives
    about 1.7 M characters from ~600 modules, in about 3 s); it is memoised per
    process.

    Args:
        max_chars: upper bound on the total number of characters.
        progress: show a progress bar on stderr.

    Returns:
        The documents, named by module path relative to the stdlib (e.g.
        ``"json/__init__.py"``).

    Raises:
        JaxattnError: bad ``max_chars``, or no standard library sources.
    """
    if isinstance(max_chars, bool) or not isinstance(max_chars, numbers.Integral) or max_chars < 1:
        raise JaxattnError(f"max_chars must be a positive integer, got {max_chars!r}")
    root = sysconfig.get_paths()["stdlib"]
    return list(_default_documents_cached(root, int(max_chars), bool(progress)))
