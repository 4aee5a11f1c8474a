"""Skip-n-gram count tables ``C^{n,s}``: sparse over observed contexts, dense only on request.

Modules:
    :mod:`~jaxattn.counts.tables`   :class:`CountMatrix`, :func:`count_matrix`, :func:`count_tables`,
                                    P and M matrices, the dense-memory budget.
    :mod:`~jaxattn.counts.keys`     packed integer keys: :func:`key_dtype`, :func:`pack_ngrams`.
    :mod:`~jaxattn.counts.kernels`  the single-device counting kernels (numpy, jitted, sort-based).
    :mod:`~jaxattn.counts.sharded`  the same counts over a device mesh (:func:`make_mesh`).
"""

from jaxattn.counts.kernels import count_keys, valid_window_starts
from jaxattn.counts.keys import key_dtype, pack_ngrams, unpack_ngrams
from jaxattn.counts.sharded import make_mesh, sharded_count_keys
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
    validate_tokens,
)

__all__ = [
    "DEFAULT_MAX_DENSE_BYTES",
    "CountMatrix",
    "SparseMatrix",
    "check_dense_size",
    "count_keys",
    "count_matrix",
    "count_tables",
    "dense_budget",
    "key_dtype",
    "make_mesh",
    "manifold_matrix",
    "pack_ngrams",
    "probability_matrix",
    "sharded_count_keys",
    "unpack_ngrams",
    "validate_tokens",
    "valid_window_starts",
]
