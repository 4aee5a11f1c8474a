"""Reading text into token-id arrays, with document boundaries.

The modules, in the order data flows through them:

* :mod:`jaxattn.corpus.formats`: JSON Lines and Parquet records, memory-mapped token files
  (:func:`open_token_file`) and documents encoded into token chunks (:func:`document_chunks`);
* :mod:`jaxattn.corpus.sources`: files, directories and globs -> :class:`Document`
  (:mod:`jaxattn.corpus.document`: name, decoded text), lazily with :func:`iter_documents`;
* :mod:`jaxattn.corpus.builtin`: the built-in stdlib-docstring corpus (:func:`default_documents`),
  cached on disk between runs;
* :mod:`jaxattn.corpus.tokenizer`: :class:`Tokenizer` (char, word or ids level)
  and :func:`build_tokenizer`;
* :mod:`jaxattn.corpus.corpus`: :class:`Corpus` (int32 ``tokens`` [N] and
  ``doc_ids`` [N]), :func:`load_corpus`, :func:`load_corpus_split` and
  :func:`split_heldout`.

Everything public is re-exported here, so ``from jaxattn.corpus import load_corpus`` works.
"""

from jaxattn.corpus.builtin import BUILTIN_SOURCE, corpus_cache_dir, default_documents
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
from jaxattn.corpus.document import Document
from jaxattn.corpus.formats import (
    DocumentStats,
    TokenFile,
    document_chunks,
    is_token_file,
    iter_records,
    open_token_file,
    record_format,
)
from jaxattn.corpus.sources import (
    BINARY_SNIFF_BYTES,
    PROGRESS_MIN_FILES,
    TEXT_EXTENSIONS,
    CorpusFiles,
    directory_glob,
    find_corpus_files,
    iter_documents,
    read_documents,
)
from jaxattn.corpus.tokenizer import (
    DEFAULT_WORD_VOCAB,
    TOKENIZER_KINDS,
    UNK,
    Tokenizer,
    TypeCounts,
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
    "CorpusFiles",
    "Document",
    "DocumentStats",
    "TokenFile",
    "Tokenizer",
    "TypeCounts",
    "build_tokenizer",
    "corpus_from_documents",
    "corpus_from_ids",
    "corpus_cache_dir",
    "default_documents",
    "directory_glob",
    "document_chunks",
    "encode_raw",
    "find_corpus_files",
    "is_token_file",
    "iter_documents",
    "iter_records",
    "load_corpus",
    "load_corpus_split",
    "open_token_file",
    "read_documents",
    "record_format",
    "split_heldout",
    "unknown_tokens_message",
]
