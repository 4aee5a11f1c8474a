"""Token-id corpora with document boundaries: build, load and split them.

A corpus is one or more *documents*. Each document becomes a run of token ids;
all runs are concatenated into one int32 array ``tokens`` [N] and a parallel
array ``doc_ids`` [N] names the document of every token, so that no n-gram
window ever has to cross a document boundary.

:func:`load_corpus` reads (:mod:`jaxattn.corpus.sources`) and tokenizes
(:mod:`jaxattn.corpus.tokenizer`) in one call; :func:`load_corpus_split` also
splits off a held-out corpus (:func:`split_heldout`) or reads one from a second
path, with one vocabulary shared by both sides.

Axes: N tokens, D documents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
import os
import platform
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from jaxattn.corpus.builtin import BUILTIN_SOURCE
from jaxattn.corpus.document import Document
from jaxattn.corpus.formats import DocumentStats
from jaxattn.corpus.sources import read_documents
from jaxattn.corpus.tokenizer import UNK, Tokenizer, build_tokenizer, encode_raw, unknown_tokens_message
from jaxattn.errors import JaxattnError
from jaxattn.typing import Int

__all__ = [
    "BUILTIN_HELDOUT",
    "DEFAULT_HELDOUT_FRACTION",
    "Corpus",
    "corpus_from_documents",
    "corpus_from_ids",
    "load_corpus",
    "load_corpus_split",
    "split_heldout",
]

DEFAULT_HELDOUT_FRACTION = 0.1
"""Held-out fraction of a single document's text when ``heldout`` is None."""

BUILTIN_HELDOUT = 0.1
"""Held-out fraction of the built-in corpus's documents when ``heldout`` is None."""

IntArray = npt.NDArray[np.int32]


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
    def doc_offsets(self) -> Int[np.ndarray, " D1"]:
        """int64 [D+1] (D1 = D+1): document d is ``tokens[offsets[d]:offsets[d+1]]``."""
        counts = (
            np.bincount(self.doc_ids, minlength=self.num_docs) if self.num_tokens else np.zeros(self.num_docs, np.int64)
        )
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def documents_tokens(self) -> list[Int[np.ndarray, " _N_d"]]:
        """Per-document token arrays.

        Returns:
            D read-only int32 views [N_d] into ``tokens``, one per document, in order.
        """
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
    stats = DocumentStats()  # the digest jaxattn count computes on the fly
    for d in docs:
        stats.update(d.name, d.text)
    return stats.hexdigest()


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
    encoded = [encode_raw(tokenizer, d.text) for d in docs]
    n_unknown = sum(int(np.count_nonzero(e < 0)) for e in encoded)
    tok = tokenizer
    if n_unknown:
        if tok.unk_id is None:
            if tok.kind != "char":
                bad = next(d for d, e in zip(docs, encoded) if (e < 0).any())
                raise JaxattnError(
                    f"document {bad.name!r}: {unknown_tokens_message(tok, bad.text, encode_raw(tokenizer, bad.text))}"
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


def _heldout_source(source: str, held_docs: Sequence[Document]) -> str:
    """``source`` plus the names of the first 3 held-out documents."""
    shown = ", ".join(d.name for d in held_docs[:3])
    return f"{source} (held out: {shown}{' ...' if len(held_docs) > 3 else ''})"


def load_corpus_split(
    path: str | os.PathLike[str] | None = None,
    *,
    eval_path: str | os.PathLike[str] | None = None,
    heldout: str | float | None = None,
    tokenizer: str | Tokenizer = "char",
    max_vocab: int | None = None,
    lowercase: bool = False,
    progress: bool = True,
) -> tuple[Corpus, Corpus]:
    """Reads a training corpus and a held-out corpus that share one vocabulary.

    The held-out side is read from ``eval_path`` when given, else split off the
    documents of ``path`` with :func:`split_heldout`. The tokenizer is built on
    the training documents only. If the held-out text has characters the
    training text lacks, ``<unk>`` is appended and the *same* extended tokenizer
    is used for both corpora, so both share one vocabulary
    (``train.tokenizer == heldout.tokenizer``).

    Args:
        path: as for :func:`load_corpus`.
        eval_path: file, directory or glob of the held-out text; None: split it
            off ``path``.
        heldout: as for :func:`split_heldout`; ignored with ``eval_path``. For
            the built-in corpus (``path`` None) None means the last
            :data:`BUILTIN_HELDOUT` (10%) of its documents.
        tokenizer, max_vocab, lowercase, progress: as for :func:`load_corpus`.

    Returns:
        ``(train, heldout)`` corpora. ``train.source`` is the path (or
        ``"builtin:stdlib-docstrings"``); ``heldout.source`` is ``eval_path``,
        or the training source followed by ``" (held out: NAMES)"`` naming the
        first 3 held-out documents (``" ..."`` when there are more).

    Raises:
        JaxattnError: as for :func:`load_corpus` and :func:`split_heldout`.
    """
    docs = read_documents(path, progress=progress)
    source = BUILTIN_SOURCE if path is None else os.fspath(path)
    if eval_path is not None:
        train_docs, held_docs = docs, read_documents(eval_path, progress=progress)
        held_source = os.fspath(eval_path)
    else:
        if path is None and heldout is None:
            heldout = BUILTIN_HELDOUT
        train_docs, held_docs = split_heldout(docs, heldout)
        held_source = _heldout_source(source, held_docs)
    tok = _resolve_tokenizer(train_docs, tokenizer, max_vocab, lowercase)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # May extend the tokenizer with <unk> for unseen held-out tokens; both share it.
        held = corpus_from_documents(held_docs, tok, source=held_source)
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
