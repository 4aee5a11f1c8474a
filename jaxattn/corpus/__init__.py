"""Reading text into token-id arrays, with document boundaries.

Three modules, in the order data flows through them:

* :mod:`jaxattn.corpus.sources`: files, directories, globs and the built-in
  stdlib-docstring corpus -> :class:`Document` (name, decoded text);
* :mod:`jaxattn.corpus.tokenizer`: :class:`Tokenizer` (char, word or ids level)
  and :func:`build_tokenizer`;
* :mod:`jaxattn.corpus.corpus`: :class:`Corpus` (int32 ``tokens`` [N] and
  ``doc_ids`` [N]), :func:`load_corpus`, :func:`load_corpus_split` and
  :func:`split_heldout`.

Everything public is re-exported here, so ``from jaxattn.corpus import load_corpus`` works.
"""

from jaxattn.corpus.corpus import (
    BUILTIN_HELDOUT,
    DEFAULT_HELDOUT_FRACTION,
    Corpus,
    corpus_from_documents,
    corpus_from_ids,
    load_corpus,
    load_corpus_split,
    split_heldout,
)
from jaxattn.corpus.sources import (
    BINARY_SNIFF_BYTES,
    BUILTIN_SOURCE,
    PROGRESS_MIN_FILES,
    TEXT_EXTENSIONS,
    Document,
    default_documents,
    directory_glob,
    read_documents,
)
from jaxattn.corpus.tokenizer import (
    DEFAULT_WORD_VOCAB,
    TOKENIZER_KINDS,
    UNK,
    Tokenizer,
    build_tokenizer,
    encode_raw,
    unknown_tokens_message,
)

__all__ = [
    "BINARY_SNIFF_BYTES",
    "BUILTIN_HELDOUT",
    "BUILTIN_SOURCE",
    "DEFAULT_HELDOUT_FRACTION",
    "DEFAULT_WORD_VOCAB",
    "PROGRESS_MIN_FILES",
    "TEXT_EXTENSIONS",
    "TOKENIZER_KINDS",
    "UNK",
    "Corpus",
    "Document",
    "Tokenizer",
    "build_tokenizer",
    "corpus_from_documents",
    "corpus_from_ids",
    "default_documents",
    "directory_glob",
    "encode_raw",
    "load_corpus",
    "load_corpus_split",
    "read_documents",
    "split_heldout",
    "unknown_tokens_message",
]
