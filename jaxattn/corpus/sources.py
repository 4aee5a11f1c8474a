"""Reading text files, directories, globs and the built-in corpus into documents.

Sources (:func:`read_documents`; :func:`iter_documents` reads them lazily, document by document):

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
* wherever a file comes from, a ``*.jsonl``/``*.ndjson`` (JSON Lines) or ``*.parquet`` file gives
  one document per record (:mod:`jaxattn.corpus.formats`),
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

import codecs
import dataclasses
import glob
import os
import re
import warnings
from collections.abc import Iterator, Sequence

from jaxattn.corpus.builtin import default_documents
from jaxattn.corpus.document import Document
from jaxattn.corpus.formats import iter_records, record_format
from jaxattn.errors import JaxattnError
from jaxattn.progress import progress_iter

__all__ = [
    "BINARY_SNIFF_BYTES",
    "PROGRESS_MIN_FILES",
    "TEXT_EXTENSIONS",
    "CorpusFiles",
    "directory_glob",
    "find_corpus_files",
    "iter_documents",
    "read_documents",
]

BINARY_SNIFF_BYTES = 8192
"""A file whose first this many bytes hold a NUL byte is binary."""

PROGRESS_MIN_FILES = 16
"""Fewer files than this: no progress bar."""

TEXT_EXTENSIONS = (".txt", ".text")
"""A directory contributes the files whose name ends in one of these (case-insensitive)."""

_GLOB_MAGIC = re.compile(r"[*?\[]")


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


def _file_documents(name: str, f: str, mode: str, raw: str) -> Iterator[tuple[Document, bool]] | None:
    """``(document, whether bytes were replaced)`` of one file: its records (JSON Lines, Parquet), else
    its text; None when it is binary.

    Raises:
        JaxattnError: an unreadable file, a bad record, or a single binary file (``mode == "file"``).
    """
    if record_format(f) is not None:
        return ((Document(name=n, text=t), False) for n, t in iter_records(f, name))
    data = _read_file(f)
    if data is None:
        if mode == "file":
            raise JaxattnError(f"not a text file (NUL bytes in its first 8 KiB): {raw}")
        return None
    text, bad = _decode(data)
    return iter([(Document(name=name, text=text), bad)] if text else [])


def _iter_named_files(
    named: Sequence[tuple[str, str]], raw: str, mode: str, progress: bool, replaced: list[str], allow_empty: bool
) -> Iterator[Document]:
    """Reads ``(name, file)`` pairs lazily, document by document.

    Binary and empty files (and empty records) are skipped (a single binary file is an error);
    the names of documents whose bytes were replaced go to ``replaced``. If no document is left,
    the error says what was skipped (unless ``allow_empty``).
    """
    n_docs = n_binary = n_empty = 0
    show = progress and len(named) >= PROGRESS_MIN_FILES
    for name, f in progress_iter(named, desc="reading corpus", enabled=show, total=len(named)):
        docs = _file_documents(name, f, mode, raw)
        if docs is None:
            n_binary += 1
            continue
        before = n_docs
        for d, bad in docs:
            if not d.text:
                continue
            if bad:
                replaced.append(d.name)
            n_docs += 1
            yield d
        n_empty += n_docs == before
    if not n_docs and not allow_empty:
        if n_empty:
            skipped = f"; {n_binary} binary file(s) skipped" if n_binary else ""
            raise JaxattnError(f"corpus is empty: {raw} ({n_empty} empty file(s){skipped})")
        where = "in directory" if mode == "dir" else "match"
        raise JaxattnError(f"no text files {where}: {raw} ({n_binary} binary file(s) skipped)")


@dataclasses.dataclass(frozen=True)
class CorpusFiles:
    """The files a corpus path names, in reading order (:func:`find_corpus_files`).

    Attributes:
        raw: the path or glob as given.
        mode: ``"dir"``, ``"file"`` or ``"glob"``.
        named: ``(name, file path)`` pairs sorted by name; a subset (e.g. one process's share)
            may be taken with ``dataclasses.replace``.
        skipped: names of the files a directory holds that the extension rule leaves out.
    """

    raw: str
    mode: str
    named: tuple[tuple[str, str], ...]
    skipped: tuple[str, ...] = ()

    def sizes(self) -> list[int]:
        """Bytes of each file, in order."""
        return [os.path.getsize(f) for _, f in self.named]


def find_corpus_files(path: str | os.PathLike[str]) -> CorpusFiles:
    """The files of a file, directory or glob path, sorted by name (see :func:`read_documents`).

    Raises:
        JaxattnError: no such path, a glob that matches nothing, or no text files.
    """
    raw = os.fspath(path)
    if not isinstance(raw, str):
        raise JaxattnError(f"corpus path must be text, got {raw!r}")
    skipped: list[str] = []
    root, files, mode = _find_files(raw, skipped)
    named = tuple(sorted((_posix_rel(f, root), f) for f in files))
    return CorpusFiles(raw=raw, mode=mode, named=named, skipped=tuple(sorted(skipped)))


def iter_documents(
    path: str | os.PathLike[str] | CorpusFiles, *, progress: bool = False, allow_empty: bool = False
) -> Iterator[Document]:
    """Reads a corpus lazily, one document at a time (:func:`read_documents` without the list).

    A ``*.jsonl``/``*.ndjson`` or ``*.parquet`` file gives one document per record
    (:mod:`jaxattn.corpus.formats`); any other file is one document.

    Args:
        path: a file, directory or glob, or the :class:`CorpusFiles` of one (a subset allowed).
        progress: a progress bar over the files (16 files or more).
        allow_empty: yield nothing instead of raising when no document is left.

    Yields:
        :class:`Document`, in name order. Warnings name skipped and non-UTF-8 files.

    Raises:
        JaxattnError: as for :func:`read_documents`.
    """
    return _documents(path, progress, allow_empty, stacklevel=2)


def _documents(
    path: str | os.PathLike[str] | CorpusFiles, progress: bool, allow_empty: bool, stacklevel: int
) -> Iterator[Document]:
    """:func:`iter_documents`, its warnings attributed ``stacklevel`` frames up from here."""
    files = path if isinstance(path, CorpusFiles) else find_corpus_files(path)
    if files.skipped:
        warnings.warn(f"{files.raw}: {_skipped_note(list(files.skipped))}", stacklevel=stacklevel)
    replaced: list[str] = []
    yield from _iter_named_files(files.named, files.raw, files.mode, progress, replaced, allow_empty)
    if replaced:
        warnings.warn(
            f"{len(replaced)} file(s) in {files.raw} are not valid UTF-8 (first: {replaced[0]}); "
            "undecodable bytes were replaced by U+FFFD",
            stacklevel=stacklevel,
        )


def read_documents(path: str | os.PathLike[str] | None = None, *, progress: bool = True) -> list[Document]:
    """Reads a file, a directory or a glob into documents, one per file.

    Args:
        path: a text file (any name), a directory (its regular non-hidden files
            named ``*.txt`` or ``*.text``, recursively; a warning names the other
            files, which are skipped), a glob pattern (``**`` allowed; every
            matching file, any name), or None for the built-in default corpus
            (:func:`default_documents`). ``~`` is expanded. A JSON Lines
            (``*.jsonl``, ``*.ndjson``) or Parquet (``*.parquet``) file gives one
            document per record (see :mod:`jaxattn.corpus.formats`).
        progress: show a progress bar on stderr (only with 16 files or more).

    Returns:
        The documents sorted by name; names are paths relative to the given
        directory (for a glob: to its directory part before the first wildcard;
        for a file: its base name; for a record: ``NAME:LINE``). Empty files are left out.

    Raises:
        JaxattnError: no such path, a glob that matches nothing, no text files,
            a single file that is binary or not a regular file, or nothing but
            empty files ("corpus is empty: PATH").
    """
    if path is None:
        return default_documents(progress=progress)
    return list(_documents(path, progress, False, stacklevel=3))
