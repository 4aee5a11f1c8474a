"""Corpus formats beyond plain text: JSON Lines, Parquet, and pre-tokenised token files.

Record formats (one document per record, read lazily, record by record):

* **JSON Lines** (``*.jsonl``, ``*.ndjson``): one JSON object per line with a string field
  ``"text"``; blank lines are skipped. A line that is not JSON, not an object, or lacks a string
  ``"text"`` is an error naming ``FILE:LINE``. Documents are named ``NAME:LINE``. Stdlib only.
* **Parquet** (``*.parquet``, ``*.pq``): the string column ``text`` (:data:`PARQUET_TEXT_COLUMN`),
  one document per row, read in record batches; null rows are skipped. Documents are named
  ``NAME:ROW`` (1-based). Needs ``pyarrow`` (``pip install 'jaxattn[parquet]'``), imported only here.

Token files (:func:`open_token_file`): a flat array of token ids, memory-mapped, never read whole:

* ``FILE.npy``: a 1-D integer ``.npy`` array (mapped at its header's data offset);
* ``FILE.u8`` / ``FILE.u16`` / ``FILE.u32``: raw little-endian unsigned ids (any other name with
  an explicit ``dtype``);
* optional sidecar ``FILE.offsets.npy``: int [D] strictly increasing document start offsets, the
  first 0 and all below N (an extra last entry equal to N, marking the end, is allowed). Without
  it the file is one document. Document d is ``tokens[offsets[d]:offsets[d+1]]``;
* optional sidecar ``FILE.tokenizer.json``: the tokenizer the ids came from
  (``Tokenizer.to_dict()``, as ``tables.json`` records it); without it the ids are their own
  vocabulary (``"ids"``, V = the largest id + 1 unless given).

Axes: N tokens of a token file, D documents, K tokens of one chunk.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from jaxattn.counts.stream import TokenChunk
from jaxattn.errors import JaxattnError

__all__ = [
    "MAX_LISTED_NAMES",
    "DocumentStats",
    "JSONL_EXTENSIONS",
    "OFFSETS_SUFFIX",
    "PARQUET_EXTENSIONS",
    "PARQUET_TEXT_COLUMN",
    "TOKENIZER_SUFFIX",
    "TOKEN_FILE_DTYPES",
    "TokenFile",
    "document_chunks",
    "is_token_file",
    "iter_records",
    "open_token_file",
    "record_format",
]

JSONL_EXTENSIONS = (".jsonl", ".ndjson")
"""File name endings read as JSON Lines."""

PARQUET_EXTENSIONS = (".parquet", ".pq")
"""File name endings read as Parquet."""

PARQUET_TEXT_COLUMN = "text"
"""The Parquet column holding the documents."""

TOKEN_FILE_DTYPES = {".u8": "<u1", ".u16": "<u2", ".u32": "<u4"}
"""Raw token-file endings and their dtypes (``.npy`` files carry their own)."""

OFFSETS_SUFFIX = ".offsets.npy"
"""Sidecar of a token file ``FILE``: ``FILE.offsets.npy``, the document start offsets."""

TOKENIZER_SUFFIX = ".tokenizer.json"
"""Sidecar of a token file ``FILE``: ``FILE.tokenizer.json``, its tokenizer."""


MAX_LISTED_NAMES = 10000
""":class:`DocumentStats` keeps the names of at most this many documents."""


class DocumentStats:
    """What a pass over documents saw: counts, names, and ``Corpus.sha256`` computed on the fly.

    The digest is the one :class:`~jaxattn.corpus.Corpus` records: over the documents in order,
    the UTF-8 of each name and text, each prefixed by its length (8 bytes, little-endian).

    Attributes:
        num_docs: documents seen (those with at least one token, when fed by :func:`document_chunks`).
        num_tokens: their tokens.
        bytes_read: UTF-8 bytes of their text.
        names: the first :data:`MAX_LISTED_NAMES` document names.
    """

    def __init__(self) -> None:
        self.num_docs = self.num_tokens = self.bytes_read = 0
        self.names: list[str] = []
        self._sha = hashlib.sha256()

    def update(self, name: str, text: str, num_tokens: int = 0) -> None:
        """Adds one document."""
        data = text.encode("utf-8", "surrogatepass")
        for part in (name.encode("utf-8", "surrogatepass"), data):
            self._sha.update(len(part).to_bytes(8, "little"))
            self._sha.update(part)
        self.num_docs += 1
        self.num_tokens += int(num_tokens)
        self.bytes_read += len(data)
        if len(self.names) < MAX_LISTED_NAMES:
            self.names.append(name)

    def hexdigest(self) -> str:
        """The sha256 so far, as hex."""
        return self._sha.hexdigest()


def document_chunks(
    docs: Iterable[Any],
    encode: Callable[[str], np.ndarray],
    chunk_tokens: int,
    *,
    first_doc_id: int = 0,
    stats: DocumentStats | None = None,
) -> Iterator[TokenChunk]:
    """Encodes documents one at a time into token chunks of about ``chunk_tokens`` tokens.

    Documents that encode to no token are left out (as :func:`~jaxattn.corpus.corpus_from_documents`
    leaves them out); the others get ids ``first_doc_id, first_doc_id + 1, ...``. A long document
    is cut across chunks (it keeps its id).

    Args:
        docs: objects with ``name`` and ``text`` (:class:`~jaxattn.corpus.Document`), in order.
        encode: text -> int [T] token ids (e.g. ``Tokenizer.encode``).
        chunk_tokens: K, tokens per chunk (the last may be shorter).
        first_doc_id: id of the first kept document.
        stats: updated with every kept document.

    Yields:
        :class:`~jaxattn.counts.stream.TokenChunk`: tokens int32 [K], doc_ids int64 [K].
    """
    k = max(int(chunk_tokens), 1)
    toks: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    held = 0
    doc_id = int(first_doc_id)
    for d in docs:
        t = np.asarray(encode(d.text), dtype=np.int32)
        if t.size == 0:
            continue
        if stats is not None:
            stats.update(d.name, d.text, t.size)
        toks.append(t)
        ids.append(np.full(t.size, doc_id, np.int64))
        doc_id += 1
        held += t.size
        if held >= k:
            tok_all, id_all = np.concatenate(toks), np.concatenate(ids)
            full = held - held % k
            for a in range(0, full, k):
                yield TokenChunk(tok_all[a : a + k], id_all[a : a + k])
            toks, ids, held = [tok_all[full:]], [id_all[full:]], held - full
    if held:
        yield TokenChunk(np.concatenate(toks), np.concatenate(ids))


def record_format(path: str) -> str | None:
    """``"jsonl"``, ``"parquet"`` or None (plain text), from the file name's ending (any case)."""
    low = path.lower()
    if low.endswith(JSONL_EXTENSIONS):
        return "jsonl"
    if low.endswith(PARQUET_EXTENSIONS):
        return "parquet"
    return None


def is_token_file(path: str) -> bool:
    """True for a name ending in ``.npy``, ``.u8``, ``.u16`` or ``.u32`` (any case)."""
    return path.lower().endswith((".npy", *TOKEN_FILE_DTYPES))


def iter_records(path: str, name: str) -> Iterator[tuple[str, str]]:
    """The documents of a JSON Lines or Parquet file, lazily.

    Args:
        path: the file.
        name: its name in the corpus; documents are named ``name:LINE`` (or ``name:ROW``).

    Yields:
        ``(document name, text)``.

    Raises:
        JaxattnError: an unreadable file, a bad line (``FILE:LINE`` named), a missing column,
            or Parquet without pyarrow.
    """
    if record_format(path) == "parquet":
        yield from _iter_parquet(path, name)
    else:
        yield from _iter_jsonl(path, name)


def _iter_jsonl(path: str, name: str) -> Iterator[tuple[str, str]]:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise JaxattnError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                why = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                raise JaxattnError(f"{path}:{lineno}: not a JSON line ({why})") from None
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                got = "no object" if not isinstance(obj, dict) else "no string field" if "text" in obj else "no field"
                raise JaxattnError(f'{path}:{lineno}: expected {{"text": "..."}}, got {got} "text"')
            yield f"{name}:{lineno}", text


def _iter_parquet(path: str, name: str) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise JaxattnError(f"reading {path} needs pyarrow: pip install 'jaxattn[parquet]'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError types
        raise JaxattnError(f"{path}: not a readable Parquet file ({e})") from None
    columns = pf.schema_arrow.names
    if PARQUET_TEXT_COLUMN not in columns:
        raise JaxattnError(f"{path}: no {PARQUET_TEXT_COLUMN!r} column (columns: {', '.join(columns[:10])})")
    row = 0
    for batch in pf.iter_batches(columns=[PARQUET_TEXT_COLUMN], batch_size=4096):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                continue
            if not isinstance(text, str):
                raise JaxattnError(f"{path}: row {row}: column {PARQUET_TEXT_COLUMN!r} is not text")
            yield f"{name}:{row}", text


@dataclasses.dataclass(frozen=True, eq=False)
class TokenFile:
    """A memory-mapped token file with its document offsets.

    Attributes:
        path: the file.
        tokens: int [N], memory-mapped (read-only).
        starts: int64 [D] document start offsets, ``starts[0] == 0``, strictly increasing.
        tokenizer: the sidecar's tokenizer description (``Tokenizer.to_dict()``), or None.
        mapping: the file's ``mmap`` (``tokens`` is a view of it), for :meth:`release`.
    """

    path: str
    tokens: np.ndarray
    starts: np.ndarray
    tokenizer: dict[str, Any] | None
    mapping: mmap.mmap | None = None

    @property
    def num_tokens(self) -> int:
        """N."""
        return int(self.tokens.shape[0])

    @property
    def num_docs(self) -> int:
        """D."""
        return int(self.starts.shape[0])

    @property
    def longest_doc(self) -> int:
        """Length of the longest document (tokens)."""
        return int(np.diff(np.append(self.starts, self.num_tokens)).max())

    def max_id(self, block: int = 1 << 26) -> int:
        """The largest token id (one pass over the file, ``block`` tokens at a time)."""
        return max(int(self.tokens[a : a + block].max()) for a in range(0, self.num_tokens, block))

    def chunks(self, chunk_tokens: int, start: int = 0, stop: int | None = None) -> Iterator[TokenChunk]:
        """The tokens ``[start, stop)`` as chunks with global document ids.

        Args:
            chunk_tokens: K, tokens per chunk.
            start: first token.
            stop: end (default N).

        Yields:
            :class:`~jaxattn.counts.stream.TokenChunk`: tokens [K] (a view of the map), doc_ids int64 [K]
            (the document index of each token).
        """
        stop = self.num_tokens if stop is None else int(stop)
        for a in range(int(start), stop, int(chunk_tokens)):
            b = min(a + int(chunk_tokens), stop)
            yield TokenChunk(self.tokens[a:b], self.doc_ids(a, b))
            self.release(a, b)

    def release(self, a: int, b: int) -> None:
        """Drops the pages of tokens ``[a, b)`` from this process's resident memory (they stay valid).

        A read-only file mapping re-reads dropped pages from the page cache when touched again,
        so this only keeps the resident set (RSS) of a pass over a large file at about one chunk.
        """
        if self.mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        base = self.tokens.__array_interface__["data"][0] - np.frombuffer(self.mapping, np.uint8, 1).ctypes.data
        lo = (base + a * self.tokens.itemsize) // mmap.PAGESIZE * mmap.PAGESIZE
        hi = base + b * self.tokens.itemsize
        if hi > lo:
            self.mapping.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def doc_ids(self, a: int, b: int) -> np.ndarray:
        """int64 [b - a]: the document index of tokens ``a .. b-1``."""
        lo = int(np.searchsorted(self.starts, a, "right"))  # starts[:lo] <= a
        hi = int(np.searchsorted(self.starts, b, "left"))  # starts[lo:hi] in (a, b)
        out = np.zeros(b - a, np.int64)
        out[self.starts[lo:hi] - a] = 1
        np.cumsum(out, out=out)
        out += lo - 1
        return out


def _load_offsets(path: str, num_tokens: int) -> np.ndarray:
    """int64 [D] document starts from the ``.offsets.npy`` sidecar of ``path`` (``[0]`` without one)."""
    side = path + OFFSETS_SUFFIX
    if not os.path.exists(side):
        return np.zeros(1, np.int64)
    try:
        off = np.load(side, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise JaxattnError(f"{side}: not a readable .npy array ({e})") from None
    if off.ndim != 1 or not np.issubdtype(off.dtype, np.integer) or off.size == 0:
        raise JaxattnError(f"{side}: offsets must be a non-empty 1-D integer array, got {off.dtype}{list(off.shape)}")
    off = np.asarray(off, dtype=np.int64)
    if off[0] != 0:
        raise JaxattnError(f"{side}: the first document offset must be 0, got {int(off[0])}")
    steps = np.diff(off)
    if steps.size and steps.min() <= 0:
        i = int(np.argmax(steps <= 0))
        raise JaxattnError(
            f"{side}: offsets must be strictly increasing, got {int(off[i])} then {int(off[i + 1])} (entry {i + 1})"
        )
    if off[-1] > num_tokens:
        raise JaxattnError(f"{side}: offset {int(off[-1])} is past the end of the {num_tokens} tokens")
    if off.size > 1 and off[-1] == num_tokens:
        off = off[:-1]  # the end marker
    return off


def _npy_layout(path: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, byte offset of the data) of a ``.npy`` file, from its header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        return np.dtype(dtype), tuple(shape), f.tell()


def _map_tokens(path: str, dtype: str | None) -> tuple[np.ndarray, mmap.mmap | None]:
    """The token array of ``path``, memory-mapped: ([N], the mapping)."""
    try:
        if path.lower().endswith(".npy") and dtype is None:
            dt, shape, offset = _npy_layout(path)
        else:
            dt = np.dtype(dtype or TOKEN_FILE_DTYPES.get(os.path.splitext(path)[1].lower(), "<u4"))
            if os.path.getsize(path) % dt.itemsize:
                raise JaxattnError(f"{path}: size {os.path.getsize(path)} is not a multiple of {dt} ({dt.itemsize} B)")
            shape, offset = (os.path.getsize(path) // dt.itemsize,), 0
        if len(shape) != 1 or not np.issubdtype(dt, np.integer) or dt == np.bool_:
            raise JaxattnError(f"{path}: a token file holds a 1-D integer array, got {dt}{list(shape)}")
        if shape[0] == 0:
            raise JaxattnError(f"corpus is empty: {path} holds no tokens")
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(mm, dtype=dt, count=shape[0], offset=offset), mm
    except (OSError, ValueError) as e:
        raise JaxattnError(f"cannot read token file {path}: {e}") from None


def open_token_file(path: str | os.PathLike[str], *, dtype: str | None = None) -> TokenFile:
    """Opens a token file (see the module docstring), memory-mapped, with its sidecars.

    Args:
        path: ``.npy``, ``.u8``, ``.u16``, ``.u32``, or any name with ``dtype``.
        dtype: numpy dtype of a raw file (e.g. ``"<u2"``); default from the name (``.npy``: its own).

    Returns:
        The :class:`TokenFile`.

    Raises:
        JaxattnError: a missing or empty file, a bad dtype or size, or bad sidecars (offsets
            not increasing, past the end; a tokenizer sidecar that is not JSON).
    """
    p = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(p):
        raise JaxattnError(f"no such token file: {p}")
    tok, mm = _map_tokens(p, dtype)
    starts = _load_offsets(p, int(tok.shape[0]))
    tokenizer = None
    if os.path.exists(p + TOKENIZER_SUFFIX):
        try:
            with open(p + TOKENIZER_SUFFIX, encoding="utf-8") as f:
                tokenizer = json.load(f)
        except (OSError, ValueError) as e:
            raise JaxattnError(f"{p + TOKENIZER_SUFFIX}: not a readable tokenizer JSON ({e})") from None
    return TokenFile(path=p, tokens=tok, starts=starts, tokenizer=tokenizer, mapping=mm)
