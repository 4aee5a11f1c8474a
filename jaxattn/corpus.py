"""Reading text into token-id arrays, with document boundaries.

A corpus is one or more *documents*. Each document becomes a run of token ids;
all runs are concatenated into one int32 array ``tokens`` [N] and a parallel
array ``doc_ids`` [N] names the document of every token, so that no n-gram
window ever has to cross a document boundary.

Sources (:func:`read_documents`):

* a text file (one document),
* a directory: every regular, non-hidden text file below it, recursively, in
  sorted order (one document per file; binary files are skipped),
* a glob pattern such as ``"data/*_gut.txt"`` or ``"data/**/*.txt"`` (sorted
  matches; a matching directory contributes its files),
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

Tokenizers (:func:`build_tokenizer`):

* ``"char"``: the vocabulary is the sorted set of characters seen, and nothing
  else (no ``<unk>``), so ``decode(encode(text)) == text``. With ``max_vocab``
  only the most frequent characters are kept and ``<unk>`` is appended. A char
  tokenizer without ``<unk>`` that meets an unseen character (say, on held-out
  text) gains ``<unk>`` as its *last* id only when needed:
  :func:`corpus_from_documents` does this (with a warning) and returns the
  extended tokenizer, all earlier ids keep their meaning. ``Tokenizer.encode``
  on its own raises a :class:`JaxattnError` naming the characters instead of
  inventing an id; :meth:`Tokenizer.with_unk` extends by hand.
  :func:`load_corpus_split` builds one shared vocabulary for both sides.
* ``"word"``: regex tokens ``\\w+|[^\\w\\s]`` (words and single punctuation
  marks), optional lowercasing (off by default). The ``max_vocab`` (default
  32000) most frequent tokens, ties broken by the token string, get ids in rank
  order; ``<unk>`` is always appended as the last id and takes everything else.
  Decoding joins tokens with single spaces (whitespace is not kept).
* ``"ids"``: token ids given directly (:func:`corpus_from_ids`), or text files
  of whitespace-separated non-negative integers.
"""

from __future__ import annotations

import ast
import codecs
import collections
import dataclasses
import functools
import glob
import hashlib
import math
import numbers
import os
import platform
import re
import sysconfig
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from jaxattn.errors import JaxattnError
from jaxattn.progress import progress_iter

__all__ = [
    "BUILTIN_SOURCE",
    "UNK",
    "Corpus",
    "Document",
    "Tokenizer",
    "build_tokenizer",
    "corpus_from_documents",
    "corpus_from_ids",
    "default_documents",
    "load_corpus",
    "load_corpus_split",
    "read_documents",
    "split_heldout",
]

UNK = "<unk>"
"""The unknown-token string (the last id of a vocabulary that has one)."""

BUILTIN_SOURCE = "builtin:stdlib-docstrings"
"""``Corpus.source`` of the built-in default corpus."""

TOKENIZER_KINDS = ("char", "word", "ids")
DEFAULT_WORD_VOCAB = 32000
DEFAULT_HELDOUT_FRACTION = 0.1
BINARY_SNIFF_BYTES = 8192
PROGRESS_MIN_FILES = 16  # fewer files than this: no progress bar

_WORD_RE = re.compile(r"\w+|[^\w\s]")
_GLOB_MAGIC = re.compile(r"[*?\[]")
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"})
_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)

IntArray = npt.NDArray[np.int32]


# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """Maps text to int32 token ids and back.

    Attributes:
        kind: ``"char"``, ``"word"`` or ``"ids"``.
        vocab: id -> token string; ``vocab[unk_id] == "<unk>"`` when there is one.
        unk_id: id that unknown tokens map to, or None. Always set for word level
            (the last id). For char level None unless characters were dropped by
            ``max_vocab`` or unseen characters forced :meth:`with_unk`.
        lowercase: word level only: lowercase text before splitting.
    """

    kind: str
    vocab: tuple[str, ...]
    unk_id: int | None = None
    lowercase: bool = False

    def __post_init__(self) -> None:
        if self.kind not in TOKENIZER_KINDS:
            raise JaxattnError(f"unknown tokenizer kind {self.kind!r}; expected one of: {', '.join(TOKENIZER_KINDS)}")
        vocab = tuple(self.vocab)
        object.__setattr__(self, "vocab", vocab)
        if not vocab:
            raise JaxattnError("tokenizer vocabulary is empty")
        if len(set(vocab)) != len(vocab):
            raise JaxattnError("tokenizer vocabulary has duplicate entries")
        if self.unk_id is not None:
            if isinstance(self.unk_id, bool) or not isinstance(self.unk_id, numbers.Integral):
                raise JaxattnError(f"unk_id must be an int or None, got {self.unk_id!r}")
            if not 0 <= int(self.unk_id) < len(vocab) or vocab[int(self.unk_id)] != UNK:
                raise JaxattnError(f"unk_id {self.unk_id} does not point at {UNK!r} in the vocabulary")
            object.__setattr__(self, "unk_id", int(self.unk_id))
        if self.kind == "char":
            bad = [t for i, t in enumerate(vocab) if len(t) != 1 and i != self.unk_id]
            if bad:
                raise JaxattnError(f"char tokenizer vocabulary entries must be single characters, got {bad[0]!r}")

    @property
    def vocab_size(self) -> int:
        """Number of ids, V (``<unk>`` included when present)."""
        return len(self.vocab)

    # -- lookup tables (computed once per tokenizer; not part of eq/hash) -- #

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.vocab)}

    @functools.cached_property
    def _char_table(self) -> IntArray:
        """int32 [max codepoint + 1]: codepoint -> id, -1 where not in the vocabulary."""
        cps = np.array([ord(t) for i, t in enumerate(self.vocab) if i != self.unk_id], dtype=np.int64)
        ids = np.array([i for i in range(len(self.vocab)) if i != self.unk_id], dtype=np.int32)
        table = np.full(int(cps.max()) + 1 if cps.size else 1, -1, dtype=np.int32)
        table[cps] = ids
        return table

    @functools.cached_property
    def _vocab_array(self) -> npt.NDArray[np.object_]:
        return np.array(self.vocab, dtype=object)

    # -- encoding -- #

    def _encode_raw(self, text: str) -> IntArray:
        """Encodes ``text``; tokens outside the vocabulary become -1 (not unk)."""
        if not isinstance(text, str):
            raise JaxattnError(f"text to encode must be a str, got {type(text).__name__}")
        if self.kind == "char":
            cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
            table = self._char_table
            inside = cps < table.shape[0]
            out = table[np.where(inside, cps, 0)]
            return np.where(inside, out, np.int32(-1)).astype(np.int32, copy=False)
        if self.kind == "word":
            words = _WORD_RE.findall(text.lower() if self.lowercase else text)
            get = self._index.get
            return np.array([get(w, -1) for w in words], dtype=np.int32).reshape(-1)
        # ids
        vals = _parse_ids(text, what="text")
        return np.where(vals < self.vocab_size, vals, -1).astype(np.int32)

    def encode(self, text: str) -> IntArray:
        """Encodes text to token ids.

        Args:
            text: the text.

        Returns:
            int32 [N] token ids in ``[0, vocab_size)``. Unknown tokens map to
            ``unk_id``.

        Raises:
            JaxattnError: unknown tokens and no ``unk_id`` (a char tokenizer
                without ``<unk>``: use :meth:`with_unk`, or build the vocabulary
                over all the text), or ids out of range for kind ``"ids"``.
        """
        ids = self._encode_raw(text)
        unknown = ids < 0
        if unknown.any():
            if self.unk_id is None:
                raise JaxattnError(_unknown_message(self, text, ids))
            ids[unknown] = self.unk_id
        return ids

    def decode(self, ids: Any) -> str:
        """Turns token ids back into text.

        Char level: the characters concatenated (exact inverse of ``encode``
        when there is no ``<unk>``). Word and ids level: tokens joined by single
        spaces. ``unk_id`` decodes to ``"<unk>"``.

        Args:
            ids: int array-like [N] (numpy, jax or list) or one int.

        Returns:
            The text.

        Raises:
            JaxattnError: ids that are not integers or are outside ``[0, vocab_size)``.
        """
        arr = np.asarray(ids)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        if arr.ndim != 1:
            raise JaxattnError(f"ids to decode must be 1-D, got shape {arr.shape}")
        if arr.size == 0:
            return ""
        if not np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
            raise JaxattnError(f"ids to decode must be integers, got dtype {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise JaxattnError(f"token id {bad} out of range for vocabulary size {self.vocab_size}")
        toks = self._vocab_array[arr].tolist()
        return "".join(toks) if self.kind == "char" else " ".join(toks)

    def with_unk(self) -> Tokenizer:
        """This tokenizer with ``<unk>`` appended as the last id (self if it has one).

        All existing ids keep their meaning, so arrays built with the old
        vocabulary stay valid; ``vocab_size`` grows by one.
        """
        if self.unk_id is not None:
            return self
        return dataclasses.replace(self, vocab=self.vocab + (UNK,), unk_id=len(self.vocab))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description; :meth:`from_dict` restores it."""
        return {"kind": self.kind, "vocab": list(self.vocab), "unk_id": self.unk_id, "lowercase": self.lowercase}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tokenizer:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                kind=d["kind"],
                vocab=tuple(d["vocab"]),
                unk_id=d.get("unk_id"),
                lowercase=bool(d.get("lowercase", False)),
            )
        except (KeyError, TypeError) as e:
            raise JaxattnError(f"not a tokenizer description: missing or bad field {e}") from None


def _unknown_message(tok: Tokenizer, text: str, ids: IntArray) -> str:
    if tok.kind == "char":
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        unseen = sorted({chr(c) for c in np.unique(cps[ids < 0]).tolist()})
        shown = ", ".join(repr(c) for c in unseen[:10]) + (", ..." if len(unseen) > 10 else "")
        return (
            f"{len(unseen)} character(s) not in the char tokenizer's vocabulary and it has no {UNK}: {shown}; "
            "build the tokenizer over all the text, or use tokenizer.with_unk()"
        )
    if tok.kind == "ids":
        return f"token ids out of range for vocabulary size {tok.vocab_size}"
    return f"tokens not in the vocabulary and the tokenizer has no {UNK}"


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def _parse_ids(text: str, *, what: str) -> npt.NDArray[np.int64]:
    parts = text.split()
    try:
        vals = np.array([int(p) for p in parts], dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next(p for p in parts if not _is_int(p))
        raise JaxattnError(
            f"{what} for the 'ids' tokenizer must hold whitespace-separated integers, got {bad[:40]!r}"
        ) from None
    if vals.size and (vals.min() < 0 or vals.max() > np.iinfo(np.int32).max):
        worst = int(vals.min()) if vals.min() < 0 else int(vals.max())
        raise JaxattnError(f"token id {worst} in {what} is outside [0, 2**31)")
    return vals


def build_tokenizer(
    docs: Sequence[Document],
    kind: str = "char",
    *,
    max_vocab: int | None = None,
    lowercase: bool = False,
) -> Tokenizer:
    """Builds a tokenizer from the documents' text.

    Args:
        docs: the documents the vocabulary is learnt from.
        kind: ``"char"``, ``"word"`` or ``"ids"``.
        max_vocab: keep at most this many tokens (by frequency, ties broken by
            the token string), plus ``<unk>``. Default: every character for
            ``"char"``, 32000 for ``"word"``. Ignored for ``"ids"``.
        lowercase: word level only: lowercase before splitting.

    Returns:
        The tokenizer. Char level: vocabulary sorted by code point. Word level:
        vocabulary in frequency-rank order, then ``<unk>``.

    Raises:
        JaxattnError: unknown kind, bad ``max_vocab``, or no tokens at all.
    """
    if not isinstance(kind, str) or kind not in TOKENIZER_KINDS:
        raise JaxattnError(f"unknown tokenizer {kind!r}; expected one of: {', '.join(TOKENIZER_KINDS)}")
    if max_vocab is not None and (
        isinstance(max_vocab, bool) or not isinstance(max_vocab, numbers.Integral) or max_vocab < 1
    ):
        raise JaxattnError(f"max_vocab must be a positive integer, got {max_vocab!r}")
    docs = list(docs)
    if kind == "char":
        counts = np.zeros(0, dtype=np.int64)
        for d in docs:
            cps = np.frombuffer(d.text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
            if cps.size == 0:
                continue
            c = np.bincount(cps)
            if c.size > counts.size:
                c[: counts.size] += counts
                counts = c
            else:
                counts[: c.size] += c
        seen = np.flatnonzero(counts)
        if seen.size == 0:
            raise JaxattnError("cannot build a tokenizer: the documents hold no text")
        unk_id = None
        if max_vocab is not None and seen.size > max_vocab:
            order = np.lexsort((seen, -counts[seen]))  # by count desc, then code point
            seen = np.sort(seen[order[:max_vocab]])
        vocab = tuple(chr(int(c)) for c in seen)
        if max_vocab is not None and len(vocab) < np.count_nonzero(counts):
            vocab, unk_id = vocab + (UNK,), len(vocab)
        return Tokenizer(kind="char", vocab=vocab, unk_id=unk_id)
    if kind == "word":
        k = DEFAULT_WORD_VOCAB if max_vocab is None else int(max_vocab)
        counter: collections.Counter[str] = collections.Counter()
        for d in docs:
            counter.update(_WORD_RE.findall(d.text.lower() if lowercase else d.text))
        if not counter:
            raise JaxattnError("cannot build a word tokenizer: the documents hold no word or punctuation tokens")
        ranked = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        vocab = tuple(t for t, _ in ranked) + (UNK,)
        return Tokenizer(kind="word", vocab=vocab, unk_id=len(vocab) - 1, lowercase=bool(lowercase))
    # ids
    hi = -1
    for d in docs:
        v = _parse_ids(d.text, what=f"document {d.name!r}")
        if v.size:
            hi = max(hi, int(v.max()))
    if hi < 0:
        raise JaxattnError("cannot build an ids tokenizer: the documents hold no ids")
    return Tokenizer(kind="ids", vocab=tuple(str(i) for i in range(hi + 1)))


# --------------------------------------------------------------------------- #
# Documents
# --------------------------------------------------------------------------- #


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


def _walk_files(root: str) -> list[str]:
    """Regular, non-hidden files below ``root`` (symlinked directories are not followed)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if fn.startswith("."):
                continue
            full = os.path.join(dirpath, fn)
            if os.path.isfile(full):
                out.append(full)
    return out


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


def read_documents(path: str | os.PathLike[str] | None = None, *, progress: bool = True) -> list[Document]:
    """Reads a file, a directory or a glob into documents, one per file.

    Args:
        path: a text file, a directory (all regular non-hidden text files below
            it, recursively), a glob pattern (``**`` allowed), or None for the
            built-in default corpus (:func:`default_documents`). ``~`` is expanded.
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
    p = os.path.expanduser(raw)
    if os.path.isdir(p):
        root, files, mode = p, _walk_files(p), "dir"
        if not files:
            raise JaxattnError(f"no text files in directory: {raw}")
    elif os.path.exists(p):
        if not os.path.isfile(p):
            raise JaxattnError(f"not a regular file or directory: {raw}")
        root, files, mode = os.path.dirname(p) or ".", [p], "file"
    elif p and _GLOB_MAGIC.search(p):
        root = _glob_root(p)
        files = []
        for m in glob.glob(p, recursive=True):
            if os.path.isdir(m):
                files.extend(_walk_files(m))
            elif os.path.isfile(m):
                files.append(m)
        files = list(dict.fromkeys(files))
        mode = "glob"
        if not files:
            raise JaxattnError(f"no files match: {raw}")
    else:
        raise JaxattnError(f"no such file or directory: {_show(raw)}")

    named = sorted((_posix_rel(f, root), f) for f in files)
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


def _collect_docstrings(body: list[ast.stmt], out: list[str]) -> None:
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


# --------------------------------------------------------------------------- #
# Corpus
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """Token ids of all documents, concatenated, with document boundaries.

    Equality is identity (the fields hold arrays). The arrays are read-only.

    Attributes:
        tokens: int32 [N], all documents concatenated, ids in ``[0, vocab_size)``.
        doc_ids: int32 [N], the document index (0..D-1, non-decreasing) of each token.
        doc_names: the D document names, in order.
        tokenizer: the tokenizer that made ``tokens``.
        source: the path or glob given, ``"builtin:stdlib-docstrings"``, or ``"ids"``.
        sha256: hex digest over the documents in order (UTF-8 of each name and
            decoded text, length-prefixed); for :func:`corpus_from_ids` over the
            token and document id arrays.
    """

    tokens: IntArray
    doc_ids: IntArray
    doc_names: tuple[str, ...]
    tokenizer: Tokenizer
    source: str
    sha256: str

    def __post_init__(self) -> None:
        # Read-only views: the caller's own arrays keep their flags.
        tokens = np.ascontiguousarray(self.tokens, dtype=np.int32).view()
        doc_ids = np.ascontiguousarray(self.doc_ids, dtype=np.int32).view()
        if tokens.ndim != 1 or doc_ids.shape != tokens.shape:
            raise JaxattnError(f"tokens {tokens.shape} and doc_ids {doc_ids.shape} must be 1-D of equal length")
        tokens.setflags(write=False)
        doc_ids.setflags(write=False)
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "doc_ids", doc_ids)
        object.__setattr__(self, "doc_names", tuple(self.doc_names))

    @property
    def vocab_size(self) -> int:
        """V, the tokenizer's vocabulary size."""
        return self.tokenizer.vocab_size

    @property
    def num_tokens(self) -> int:
        """N."""
        return int(self.tokens.shape[0])

    @property
    def num_docs(self) -> int:
        """D."""
        return len(self.doc_names)

    @property
    def doc_offsets(self) -> npt.NDArray[np.int64]:
        """int64 [D+1]: document d is ``tokens[offsets[d]:offsets[d+1]]``."""
        counts = (
            np.bincount(self.doc_ids, minlength=self.num_docs) if self.num_tokens else np.zeros(self.num_docs, np.int64)
        )
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def documents_tokens(self) -> list[IntArray]:
        """Per-document token arrays: D read-only int32 views [N_d] into ``tokens``."""
        off = self.doc_offsets
        return [self.tokens[off[d] : off[d + 1]] for d in range(self.num_docs)]

    def info(self) -> dict[str, Any]:
        """JSON-able summary.

        Returns:
            ``{"source", "num_docs", "num_tokens", "vocab_size", "tokenizer",
            "unk_id", "sha256", "files"}``, plus ``"python_version"`` for the
            built-in corpus (whose text depends on it).
        """
        d: dict[str, Any] = {
            "source": self.source,
            "num_docs": self.num_docs,
            "num_tokens": self.num_tokens,
            "vocab_size": self.vocab_size,
            "tokenizer": self.tokenizer.kind,
            "unk_id": self.tokenizer.unk_id,
            "sha256": self.sha256,
            "files": list(self.doc_names),
        }
        if self.source == BUILTIN_SOURCE:
            d["python_version"] = platform.python_version()
        return d

    def __repr__(self) -> str:
        return (
            f"Corpus(source={self.source!r}, num_docs={self.num_docs}, num_tokens={self.num_tokens}, "
            f"vocab_size={self.vocab_size}, tokenizer={self.tokenizer.kind!r}, sha256={self.sha256[:12]}...)"
        )


def _docs_sha256(docs: Iterable[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        for part in (d.name.encode("utf-8", "surrogatepass"), d.text.encode("utf-8", "surrogatepass")):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h.hexdigest()


def corpus_from_documents(docs: Sequence[Document], tokenizer: Tokenizer, *, source: str) -> Corpus:
    """Encodes documents with a tokenizer into a :class:`Corpus`.

    Documents that encode to no token (e.g. only whitespace at word level) are
    dropped, so every document of the corpus has at least one token. A char
    tokenizer without ``<unk>`` that meets unseen characters is extended with
    :meth:`Tokenizer.with_unk` (a warning says so); ``corpus.tokenizer`` is
    then the extended one.

    Args:
        docs: the documents, in order.
        tokenizer: the tokenizer.
        source: recorded as ``Corpus.source``.

    Returns:
        The corpus; tokens int32 [N], doc_ids int32 [N].

    Raises:
        JaxattnError: no documents, or no tokens at all ("corpus is empty").
    """
    if not isinstance(tokenizer, Tokenizer):
        raise JaxattnError(f"tokenizer must be a Tokenizer, got {type(tokenizer).__name__}")
    docs = list(docs)
    encoded = [tokenizer._encode_raw(d.text) for d in docs]
    n_unknown = sum(int(np.count_nonzero(e < 0)) for e in encoded)
    tok = tokenizer
    if n_unknown:
        if tok.unk_id is None:
            if tok.kind != "char":
                bad = next(d for d, e in zip(docs, encoded) if (e < 0).any())
                raise JaxattnError(
                    f"document {bad.name!r}: {_unknown_message(tok, bad.text, tokenizer._encode_raw(bad.text))}"
                )
            tok = tok.with_unk()
            warnings.warn(
                f"{n_unknown} character(s) not in the tokenizer's vocabulary were mapped to {UNK} "
                f"(new id {tok.unk_id}; vocabulary size {tok.vocab_size})",
                stacklevel=2,
            )
        unk_id = int(tok.unk_id)  # type: ignore[arg-type]  # set by with_unk() above
        for e in encoded:
            e[e < 0] = unk_id
    kept = [(d, e) for d, e in zip(docs, encoded) if e.size > 0]
    if not kept:
        raise JaxattnError(f"corpus is empty: {source}")
    lengths = np.array([e.size for _, e in kept], dtype=np.int64)
    tokens = np.concatenate([e for _, e in kept]).astype(np.int32, copy=False)
    doc_ids = np.repeat(np.arange(len(kept), dtype=np.int32), lengths)
    return Corpus(
        tokens=tokens,
        doc_ids=doc_ids,
        doc_names=tuple(d.name for d, _ in kept),
        tokenizer=tok,
        source=source,
        sha256=_docs_sha256(d for d, _ in kept),
    )


def _resolve_tokenizer(
    docs: Sequence[Document], tokenizer: str | Tokenizer, max_vocab: int | None, lowercase: bool
) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if not isinstance(tokenizer, str) or tokenizer not in ("char", "word"):
        raise JaxattnError(f"unknown tokenizer {tokenizer!r}; expected 'char' or 'word'")
    return build_tokenizer(docs, tokenizer, max_vocab=max_vocab, lowercase=lowercase)


def load_corpus(
    path: str | os.PathLike[str] | None = None,
    *,
    tokenizer: str | Tokenizer = "char",
    max_vocab: int | None = None,
    lowercase: bool = False,
    progress: bool = True,
) -> Corpus:
    """Reads and tokenizes a corpus in one call.

    Args:
        path: file, directory, glob, or None for the built-in stdlib-docstring corpus.
        tokenizer: ``"char"``, ``"word"`` (built on these documents), or a ready
            :class:`Tokenizer`.
        max_vocab: vocabulary cap for a tokenizer built here (see :func:`build_tokenizer`).
        lowercase: word level: lowercase first.
        progress: progress bars on stderr.

    Returns:
        The corpus.

    Raises:
        JaxattnError: any problem with the path, its files or the tokenizer.
    """
    docs = read_documents(path, progress=progress)
    tok = _resolve_tokenizer(docs, tokenizer, max_vocab, lowercase)
    source = BUILTIN_SOURCE if path is None else os.fspath(path)
    return corpus_from_documents(docs, tok, source=source)


def load_corpus_split(
    path: str | os.PathLike[str] | None = None,
    *,
    heldout: str | float | None = None,
    tokenizer: str | Tokenizer = "char",
    max_vocab: int | None = None,
    lowercase: bool = False,
    progress: bool = True,
) -> tuple[Corpus, Corpus]:
    """Reads a corpus and splits it into training and held-out corpora.

    The tokenizer is built on the training documents only. If the held-out
    text has characters the training text lacks, ``<unk>`` is appended and the
    *same* extended tokenizer is used for both corpora, so both share one
    vocabulary (``train.tokenizer == heldout.tokenizer``).

    Args:
        path: as for :func:`load_corpus`.
        heldout: as for :func:`split_heldout`.
        tokenizer, max_vocab, lowercase, progress: as for :func:`load_corpus`.

    Returns:
        ``(train, heldout)`` corpora.

    Raises:
        JaxattnError: as for :func:`load_corpus` and :func:`split_heldout`.
    """
    docs = read_documents(path, progress=progress)
    train_docs, held_docs = split_heldout(docs, heldout)
    tok = _resolve_tokenizer(train_docs, tokenizer, max_vocab, lowercase)
    source = BUILTIN_SOURCE if path is None else os.fspath(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        held = corpus_from_documents(held_docs, tok, source=source)
    train = corpus_from_documents(train_docs, held.tokenizer, source=source)
    return train, held


def corpus_from_ids(tokens: Any, doc_ids: Any = None, vocab_size: int | None = None) -> Corpus:
    """Wraps token id arrays given directly as a :class:`Corpus`.

    Documents are the maximal runs of equal ``doc_ids``; they are renumbered
    0..D-1 and named ``"doc0"``, ``"doc1"``, ...

    Args:
        tokens: int array-like [N] (numpy, jax or list) of ids in ``[0, vocab_size)``.
        doc_ids: optional int array-like [N]; default: one document.
        vocab_size: V; default ``max(tokens) + 1``.

    Returns:
        The corpus, with ``Tokenizer(kind="ids", vocab=("0", "1", ..., str(V-1)))``
        and ``source="ids"``.

    Raises:
        JaxattnError: empty or non-integer arrays, shape mismatch, negative ids,
            or ids not below ``vocab_size``.
    """
    tok = np.asarray(tokens)
    if tok.ndim != 1:
        raise JaxattnError(f"tokens must be a 1-D array, got shape {tok.shape}")
    if tok.size == 0:
        raise JaxattnError("corpus is empty: tokens has length 0")
    if not np.issubdtype(tok.dtype, np.integer) or tok.dtype == np.bool_:
        raise JaxattnError(f"tokens must be integers, got dtype {tok.dtype}")
    lo, hi = int(tok.min()), int(tok.max())
    if lo < 0:
        raise JaxattnError(f"token id {lo} is negative")
    if vocab_size is None:
        vocab_size = hi + 1
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) or vocab_size < 1:
        raise JaxattnError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if vocab_size > np.iinfo(np.int32).max:
        raise JaxattnError(f"vocab_size {vocab_size} does not fit int32")
    if hi >= vocab_size:
        raise JaxattnError(f"token id {hi} out of range for vocab_size {vocab_size}")
    if doc_ids is None:
        runs = np.zeros(tok.shape, dtype=np.int32)
    else:
        d = np.asarray(doc_ids)
        if d.shape != tok.shape:
            raise JaxattnError(f"doc_ids shape {d.shape} differs from tokens shape {tok.shape}")
        if not np.issubdtype(d.dtype, np.integer) or d.dtype == np.bool_:
            raise JaxattnError(f"doc_ids must be integers, got dtype {d.dtype}")
        runs = np.concatenate([[0], np.cumsum(d[1:] != d[:-1])]).astype(np.int32)
    tok32 = tok.astype(np.int32)
    h = hashlib.sha256()
    h.update(tok32.astype("<i4").tobytes())
    h.update(runs.astype("<i4").tobytes())
    num_docs = int(runs[-1]) + 1
    return Corpus(
        tokens=tok32,
        doc_ids=runs,
        doc_names=tuple(f"doc{i}" for i in range(num_docs)),
        tokenizer=Tokenizer(kind="ids", vocab=tuple(str(i) for i in range(int(vocab_size)))),
        source="ids",
        sha256=h.hexdigest(),
    )


# --------------------------------------------------------------------------- #
# Held-out split
# --------------------------------------------------------------------------- #


def _match_names(docs: Sequence[Document], key: str) -> list[int]:
    """Indices of documents matched by ``key``, trying ever looser rules in turn.

    Rules: exact name; exact base name; base name without extension; base name
    prefix; substring of the name. The first rule with any match wins.
    """
    names = [d.name for d in docs]
    base = [n.rsplit("/", 1)[-1] for n in names]
    stem = [b.rsplit(".", 1)[0] if "." in b.lstrip(".") else b for b in base]
    k = key.replace(os.sep, "/")
    rules: list[list[bool]] = [
        [n == k for n in names],
        [b == k for b in base],
        [t == k for t in stem],
        [b.startswith(k) for b in base],
        [k in n for n in names],
    ]
    for matched in rules:
        hits = [i for i, m in enumerate(matched) if m]
        if hits:
            return hits
    return []


def _few(names: Sequence[str], k: int = 8) -> str:
    shown = ", ".join(names[:k])
    return shown + (f", ... ({len(names)} in all)" if len(names) > k else "")


def _split_one(doc: Document, frac: float) -> tuple[list[Document], list[Document]]:
    n = len(doc.text)
    cut = round(n * (1.0 - frac))
    if cut <= 0 or cut >= n:
        raise JaxattnError(
            f"held-out fraction {frac} of the single document {doc.name!r} ({n} characters) leaves one side empty"
        )
    return (
        [Document(name=f"{doc.name}[:{cut}]", text=doc.text[:cut])],
        [Document(name=f"{doc.name}[{cut}:]", text=doc.text[cut:])],
    )


def split_heldout(
    docs: Sequence[Document], heldout: str | float | None = None
) -> tuple[list[Document], list[Document]]:
    """Splits documents into training and held-out sets.

    Args:
        docs: the documents (as read: sorted by name).
        heldout: which text to hold out:

            * a document name, base name, stem, name prefix or substring (e.g.
              ``"lear"`` or ``"lear_gut.txt"``): that one document. A key that
              matches several documents at its best rule is an error.
            * a fraction in (0, 1) (a float, or a string such as ``"0.1"`` that
              matches no name): the last ``ceil(frac * D)`` documents in the
              given order; with a single document, its text is cut at
              ``round((1 - frac) * len)`` characters into ``name[:cut]`` (train)
              and ``name[cut:]`` (held out).
            * None: the last document if there are several, else the last 10%
              of the single document's text.

    Returns:
        ``(train_docs, heldout_docs)``, both non-empty, in the given order.

    Raises:
        JaxattnError: no documents, an unknown or ambiguous name (a few
            available names are listed), a fraction outside (0, 1), or a split
            that leaves either side empty.
    """
    docs = list(docs)
    if not docs:
        raise JaxattnError("corpus is empty: no documents to split")
    if heldout is None:
        if len(docs) == 1:
            return _split_one(docs[0], DEFAULT_HELDOUT_FRACTION)
        return docs[:-1], docs[-1:]
    if isinstance(heldout, str):
        key = heldout.strip()
        if not key:
            raise JaxattnError("held-out document name is empty")
        hits = _match_names(docs, key)
        if len(hits) > 1:
            raise JaxattnError(
                f"held-out name {heldout!r} is ambiguous; it matches: {_few([docs[i].name for i in hits])}"
            )
        if hits:
            if len(docs) == 1:
                raise JaxattnError(
                    f"holding out {docs[hits[0]].name!r} leaves no training documents "
                    "(give a fraction to split a single document)"
                )
            i = hits[0]
            return docs[:i] + docs[i + 1 :], [docs[i]]
        try:
            frac = float(key)
        except ValueError:
            raise JaxattnError(
                f"no document matches held-out name {heldout!r}; available: {_few([d.name for d in docs])}"
            ) from None
        heldout = frac
    if isinstance(heldout, bool) or not isinstance(heldout, numbers.Real):
        raise JaxattnError(f"heldout must be a document name, a fraction in (0, 1) or None, got {heldout!r}")
    frac = float(heldout)
    if not (0.0 < frac < 1.0):
        raise JaxattnError(f"held-out fraction must be in (0, 1), got {heldout!r}")
    if len(docs) == 1:
        return _split_one(docs[0], frac)
    k = math.ceil(frac * len(docs))
    if k >= len(docs):
        raise JaxattnError(
            f"held-out fraction {frac} of {len(docs)} documents holds out all {k} of them, leaving no training documents"
        )
    return docs[:-k], docs[-k:]
