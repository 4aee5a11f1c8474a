"""Tokenizers: text to int32 token ids and back, at char, word or id level.

Tokenizers (:func:`build_tokenizer`):

* ``"char"``: the vocabulary is the sorted set of characters seen, and nothing
  else (no ``<unk>``), so ``decode(encode(text)) == text``. With ``max_vocab``
  only the most frequent characters are kept and ``<unk>`` is appended. A char
  tokenizer without ``<unk>`` that meets an unseen character (say, on held-out
  text) gains ``<unk>`` as its *last* id only when needed:
  :func:`jaxattn.corpus.corpus_from_documents` does this (with a warning) and
  returns the extended tokenizer, all earlier ids keep their meaning.
  ``Tokenizer.encode`` on its own raises a :class:`JaxattnError` naming the
  characters instead of inventing an id; :meth:`Tokenizer.with_unk` extends by
  hand. :func:`jaxattn.corpus.load_corpus_split` builds one shared vocabulary
  for both sides.
* ``"word"``: regex tokens ``\\w+|[^\\w\\s]`` (words and single punctuation
  marks), optional lowercasing (off by default). The ``max_vocab`` (default
  32000) most frequent tokens, ties broken by the token string, get ids in rank
  order; ``<unk>`` is always appended as the last id and takes everything else.
  Decoding joins tokens with single spaces (whitespace is not kept).
* ``"ids"``: token ids given directly (:func:`jaxattn.corpus.corpus_from_ids`),
  or text files of whitespace-separated non-negative integers.

Axes: N tokens of one text.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from jaxattn.corpus.document import Document
from jaxattn.errors import JaxattnError
from jaxattn.typing import Int

__all__ = [
    "DEFAULT_WORD_VOCAB",
    "TOKENIZER_KINDS",
    "UNK",
    "Tokenizer",
    "TypeCounts",
    "build_tokenizer",
    "encode_raw",
    "unknown_tokens_message",
]

UNK = "<unk>"
"""The unknown-token string (the last id of a vocabulary that has one)."""

TOKENIZER_KINDS = ("char", "word", "ids")
"""The tokenizer kinds."""

DEFAULT_WORD_VOCAB = 32000
"""Word-level vocabulary size (before ``<unk>``) when ``max_vocab`` is not given."""

_WORD_RE = re.compile(r"\w+|[^\w\s]")

IntArray = npt.NDArray[np.int32]


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

    def encode(self, text: str) -> Int[np.ndarray, " N"]:
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
                raise JaxattnError(unknown_tokens_message(self, text, ids))
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

        Returns:
            The extended tokenizer, or ``self`` when it already has ``<unk>``.
        """
        if self.unk_id is not None:
            return self
        return dataclasses.replace(self, vocab=self.vocab + (UNK,), unk_id=len(self.vocab))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description; :meth:`from_dict` restores it.

        Returns:
            ``{"kind", "vocab", "unk_id", "lowercase"}``.
        """
        return {"kind": self.kind, "vocab": list(self.vocab), "unk_id": self.unk_id, "lowercase": self.lowercase}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tokenizer:
        """Inverse of :meth:`to_dict`.

        Args:
            d: a dict as written by :meth:`to_dict` (``unk_id`` and ``lowercase`` optional).

        Returns:
            The tokenizer.

        Raises:
            JaxattnError: a missing or malformed field.
        """
        try:
            return cls(
                kind=d["kind"],
                vocab=tuple(d["vocab"]),
                unk_id=d.get("unk_id"),
                lowercase=bool(d.get("lowercase", False)),
            )
        except (KeyError, TypeError) as e:
            raise JaxattnError(f"not a tokenizer description: missing or bad field {e}") from None


def encode_raw(tokenizer: Tokenizer, text: str) -> Int[np.ndarray, " N"]:
    """Encodes text, marking tokens outside the vocabulary with -1 instead of ``unk_id``.

    Args:
        tokenizer: the tokenizer.
        text: the text.

    Returns:
        int32 [N] token ids, -1 where a token is not in the vocabulary.

    Raises:
        JaxattnError: ``text`` is not a str, or (kind ``"ids"``) holds something
            other than non-negative integers below 2**31.
    """
    return tokenizer._encode_raw(text)


def unknown_tokens_message(tok: Tokenizer, text: str, ids: Int[np.ndarray, " N"]) -> str:
    """The error message for text with tokens outside the vocabulary and no ``<unk>``.

    Args:
        tok: the tokenizer.
        text: the text that was encoded.
        ids: int32 [N], its :func:`encode_raw` ids (-1 marks an unknown token).

    Returns:
        The message; at char level it names up to 10 unseen characters.
    """
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


class TypeCounts:
    """Token-type counts gathered in one streaming pass, from which :func:`build_tokenizer`'s vocabulary follows.

    ``TypeCounts(kind)``, then :meth:`update` with each document's text, then :meth:`tokenizer`
    gives exactly the tokenizer :func:`build_tokenizer` builds on the same documents. Counts from
    several passes (or processes) add up with :meth:`merge` or via :meth:`to_dict` / :meth:`from_dict`.

    Attributes:
        kind: ``"char"``, ``"word"`` or ``"ids"``.
        lowercase: word level: lowercase before splitting.
    """

    def __init__(self, kind: str = "char", *, lowercase: bool = False) -> None:
        if not isinstance(kind, str) or kind not in TOKENIZER_KINDS:
            raise JaxattnError(f"unknown tokenizer {kind!r}; expected one of: {', '.join(TOKENIZER_KINDS)}")
        self.kind, self.lowercase = kind, bool(lowercase)
        self._chars = np.zeros(0, np.int64)  # char: count per code point
        self._words: collections.Counter[str] = collections.Counter()  # word: count per token
        self._max_id = -1  # ids: the largest id

    def update(self, text: str, name: str = "text") -> None:
        """Adds one document's tokens (``name`` is used in the error for bad ids)."""
        if self.kind == "char":
            cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
            if cps.size:
                self._add_chars(np.bincount(cps))
        elif self.kind == "word":
            self._words.update(_WORD_RE.findall(text.lower() if self.lowercase else text))
        else:
            v = _parse_ids(text, what=f"document {name!r}")
            if v.size:
                self._max_id = max(self._max_id, int(v.max()))

    def _add_chars(self, c: np.ndarray) -> None:
        c = c.astype(np.int64, copy=False)
        if c.size > self._chars.size:
            c = c.copy()
            c[: self._chars.size] += self._chars
            self._chars = c
        else:
            self._chars[: c.size] += c

    def to_dict(self) -> dict[str, int]:
        """``{token: count}`` (ids level: ``{str(max id): 1}``), for sums across processes."""
        if self.kind == "char":
            seen = np.flatnonzero(self._chars)
            return {chr(int(c)): int(self._chars[c]) for c in seen}
        if self.kind == "word":
            return dict(self._words)
        return {} if self._max_id < 0 else {str(self._max_id): 1}

    @classmethod
    def from_dict(cls, counts: Mapping[str, int], kind: str, *, lowercase: bool = False) -> TypeCounts:
        """Inverse of :meth:`to_dict` (the sum of several, for ``kind="ids"`` the max id is kept)."""
        out = cls(kind, lowercase=lowercase)
        if kind == "char" and counts:
            cps = np.array([ord(t) for t in counts], np.int64)
            c = np.zeros(int(cps.max()) + 1, np.int64)
            c[cps] = np.array([int(v) for v in counts.values()], np.int64)
            out._add_chars(c)
        elif kind == "word":
            out._words.update({t: int(v) for t, v in counts.items() if int(v)})
        elif counts:
            out._max_id = max(int(t) for t in counts)
        return out

    def merge(self, other: TypeCounts) -> None:
        """Adds another pass's counts (same kind)."""
        self._add_chars(other._chars)
        self._words.update(other._words)
        self._max_id = max(self._max_id, other._max_id)

    def tokenizer(self, max_vocab: int | None = None) -> Tokenizer:
        """The tokenizer of these counts (see :func:`build_tokenizer` for the rules).

        Raises:
            JaxattnError: bad ``max_vocab``, or no tokens at all.
        """
        _check_max_vocab(max_vocab)
        if self.kind == "char":
            return _char_tokenizer(self._chars, max_vocab)
        if self.kind == "word":
            return _word_tokenizer(self._words, max_vocab, self.lowercase)
        if self._max_id < 0:
            raise JaxattnError("cannot build an ids tokenizer: the documents hold no ids")
        return Tokenizer(kind="ids", vocab=tuple(str(i) for i in range(self._max_id + 1)))


def _check_max_vocab(max_vocab: Any) -> None:
    if max_vocab is not None and (
        isinstance(max_vocab, bool) or not isinstance(max_vocab, numbers.Integral) or max_vocab < 1
    ):
        raise JaxattnError(f"max_vocab must be a positive integer, got {max_vocab!r}")


def _char_tokenizer(counts: np.ndarray, max_vocab: int | None) -> Tokenizer:
    """Char vocabulary sorted by code point; the ``max_vocab`` most frequent plus ``<unk>`` when capped."""
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


def _word_tokenizer(counter: collections.Counter[str], max_vocab: int | None, lowercase: bool) -> Tokenizer:
    """Word vocabulary in frequency-rank order (ties by token string), then ``<unk>``."""
    k = DEFAULT_WORD_VOCAB if max_vocab is None else int(max_vocab)
    if not counter:
        raise JaxattnError("cannot build a word tokenizer: the documents hold no word or punctuation tokens")
    ranked = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    vocab = tuple(t for t, _ in ranked) + (UNK,)
    return Tokenizer(kind="word", vocab=vocab, unk_id=len(vocab) - 1, lowercase=bool(lowercase))


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
    counts = TypeCounts(kind, lowercase=lowercase)
    _check_max_vocab(max_vocab)
    for d in docs:
        counts.update(d.text, d.name)
    return counts.tokenizer(max_vocab)
