"""Skip-n-gram count tables ``C^{n,s}``: sparse over observed contexts, dense only on request.

Modules:
    :mod:`~jaxattn.counts.tables`   :class:`CountMatrix`, :func:`count_matrix`, :func:`count_tables`,
                                    P and M matrices, the dense-memory budget.
    :mod:`~jaxattn.counts.keys`     packed integer keys: :func:`key_dtype`, :func:`pack_ngrams`.
    :mod:`~jaxattn.counts.kernels`  the single-device counting kernels (numpy, jitted, sort-based).
    :mod:`~jaxattn.counts.sharded`  the same counts over a device mesh (:func:`make_mesh`).
    :mod:`~jaxattn.counts.stream`   the same tables from a stream of token chunks (:func:`count_stream`),
                                    memory bounded by a chunk plus the tables.
    :mod:`~jaxattn.counts.distributed`  multi-process (multi-host) counting: :func:`init_distributed`,
                                    shares, and the exact cross-process reductions (:func:`allreduce_keyed`).
"""

from jaxattn.counts.distributed import (
    allreduce_counts,
    allreduce_int,
    allreduce_keyed,
    allreduce_sorted,
    cluster_environment,
    exclusive_prefix_sum,
    init_distributed,
    is_multiprocess,
    process_mesh,
    process_share,
)
from jaxattn.counts.kernels import count_keys, valid_window_starts
from jaxattn.counts.keys import key_dtype, merge_keyed_runs, pack_ngrams, unpack_ngrams
from jaxattn.counts.sharded import make_mesh, sharded_count_keys
from jaxattn.counts.stream import (
    DEFAULT_STREAM_MEMORY,
    StreamCounter,
    TokenChunk,
    count_stream,
    count_stream_keys,
    tables_from_counter,
)
from jaxattn.counts.tables import (
    DEFAULT_MAX_DENSE_BYTES,
    CountMatrix,
    SparseMatrix,
    check_dense_size,
    count_matrix,
    count_tables,
    dense_budget,
    manifold_matrix,
    probability_matrix,
    tables_from_keys,
    validate_tokens,
)

__all__ = [
    "DEFAULT_MAX_DENSE_BYTES",
    "DEFAULT_STREAM_MEMORY",
    "CountMatrix",
    "SparseMatrix",
    "StreamCounter",
    "TokenChunk",
    "allreduce_counts",
    "allreduce_int",
    "allreduce_keyed",
    "allreduce_sorted",
    "check_dense_size",
    "cluster_environment",
    "count_keys",
    "count_matrix",
    "count_stream",
    "count_stream_keys",
    "count_tables",
    "dense_budget",
    "exclusive_prefix_sum",
    "init_distributed",
    "is_multiprocess",
    "key_dtype",
    "make_mesh",
    "manifold_matrix",
    "merge_keyed_runs",
    "pack_ngrams",
    "probability_matrix",
    "process_mesh",
    "process_share",
    "sharded_count_keys",
    "tables_from_counter",
    "tables_from_keys",
    "unpack_ngrams",
    "validate_tokens",
    "valid_window_starts",
]
