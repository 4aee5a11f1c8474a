"""The data of ``report.html``: a run's attention arrays and metrics, packed small for the browser.

What goes in (:func:`attention_data`), for the first ``num_seqs`` evaluation sequences and the first
``max_positions`` positions (exact: the attention is causal, so row i only involves keys j <= i):

* ``expected``: uint8 [P, b, T(T+1)/2], each distinct (n, s) table's expected attention, the
  causal lower triangle of each [T, T] matrix packed row by row (row i at offset i(i+1)/2), each
  row quantised to 255 steps of its maximum (:func:`quantise_rows`), which is ``expected_scale``:
  float16 [P, b, T]; a probability is ``q / 255 * scale`` (within ``scale / 510``);
* ``valid``: uint8 [P, b, T], the queries the metrics keep (the mask is causal & valid);
* ``actual``, ``actual_scale``: the same for one slab per *distinct* head attention over every
  option (``actual_slot[option][l*H + h]`` indexes it: heads with identical arrays share one slab);
* ``query``: float16 [Q, b, T, M], the per-query metrics (:func:`jaxattn.alignment.query_metrics`,
  on the float32 arrays) of each distinct (attention slab, table) pair (``query_slot``).

Each slab is deflated (zlib) and base64-encoded (:func:`encode_slab`, :func:`decode_slab`); the
page inflates it with the browser's own ``DecompressionStream``.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.alignment import METRIC_NAMES, query_metrics
from jaxattn.errors import JaxattnError
from jaxattn.output.attention_plots import format_value
from jaxattn.output.plots import metric_ranges, repeated_cells
from jaxattn.typing import ArrayLike, Float, Shaped

__all__ = [
    "METRIC_FORMAT",
    "REPORT_MAX_POSITIONS",
    "REPORT_SEQS",
    "attention_data",
    "decode_slab",
    "dequantise_rows",
    "encode_slab",
    "head_records",
    "pack_triangle",
    "quantise_rows",
    "unpack_triangle",
]

#: Sequences shown in the report (the first ones of the run's evaluation sequences).
REPORT_SEQS = 8
#: Positions shown per sequence (the first ones).
REPORT_MAX_POSITIONS = 128
#: How the page prints a head's metrics (the same numbers as ``metrics.json``, formatted in Python).
METRIC_FORMAT = ".4f"
#: Heads' per-query metrics computed per call (a fixed batch: one compilation).
_QUERY_BATCH = 16

LABELS = {
    "kl": "KL",
    "cosine": "cosine",
    "argmax_match": "argmax match",
    "argmax_match_tied": "tied argmax",
    "entropy": "entropy",
}
BETTER = {
    "kl": "lower is closer",
    "cosine": "higher is closer",
    "argmax_match": "higher is closer",
    "argmax_match_tied": "higher is closer",
    "entropy": "1 = uniform",
}


def pack_triangle(x: Shaped[ArrayLike, "*B T T"]) -> Shaped[np.ndarray, "*B R"]:
    """The causal lower triangle of ``[..., T, T]`` matrices, row by row: ``[..., T(T+1)/2]``."""
    x = np.asarray(x)
    i, j = np.tril_indices(x.shape[-1])
    return x[..., i, j]


def unpack_triangle(x: Shaped[ArrayLike, "*B R"], T: int) -> Shaped[np.ndarray, "*B T T"]:
    """The inverse of :func:`pack_triangle` (zeros above the diagonal)."""
    x = np.asarray(x)
    out = np.zeros((*x.shape[:-1], T, T), x.dtype)
    i, j = np.tril_indices(T)
    out[..., i, j] = x
    return out


def quantise_rows(x: Float[ArrayLike, "*B T T"]) -> tuple[Shaped[np.ndarray, "*B R"], Shaped[np.ndarray, "*B T"]]:
    """Causal attention rows as uint8 steps of each row's maximum: ``x[..., i, j] ~ q / 255 * scale[..., i]``.

    Args:
        x: float [..., T, T] attention (rows of non-negative weights; only ``j <= i`` is kept).

    Returns:
        (uint8 [..., T(T+1)/2] packed (:func:`pack_triangle`), float16 [..., T] row maxima); the
        error of ``q / 255 * scale`` is at most ``scale / 510`` plus float16's rounding of the scale.
    """
    x = np.asarray(x, np.float32)
    T = x.shape[-1]
    scale = np.max(np.where(np.tril(np.ones((T, T), bool)), x, 0.0), -1).astype(np.float16)
    s = scale.astype(np.float32)[..., None]
    q = np.clip(np.rint(255.0 * x / np.where(s > 0, s, 1.0)), 0, 255).astype(np.uint8)
    return pack_triangle(q), scale


def dequantise_rows(q: Shaped[ArrayLike, "*B R"], scale: Shaped[ArrayLike, "*B T"]) -> Float[np.ndarray, "*B T T"]:
    """The float32 [..., T, T] attention of :func:`quantise_rows` (zeros above the diagonal)."""
    scale = np.asarray(scale, np.float32)
    return unpack_triangle(np.asarray(q, np.float32), scale.shape[-1]) / 255.0 * scale[..., None]


def encode_slab(x: ArrayLike, *, level: int = 6) -> dict[str, Any]:
    """A float16 or uint8 array as ``{"dtype", "shape", "compression", "data"}`` (deflated, base64).

    Args:
        x: the array; float arrays are stored as float16 (little-endian), anything else as uint8.
        level: zlib compression level.

    Returns:
        The JSON-able slab.
    """
    x = np.asarray(x)
    arr = x.astype("<f2") if np.issubdtype(x.dtype, np.floating) else x.astype(np.uint8)
    data = base64.b64encode(zlib.compress(np.ascontiguousarray(arr).tobytes(), level)).decode("ascii")
    dtype = "float16" if arr.dtype.kind == "f" else "uint8"
    return {"dtype": dtype, "shape": list(arr.shape), "compression": "deflate", "data": data}


def decode_slab(slab: dict[str, Any]) -> np.ndarray:
    """The array of an :func:`encode_slab` slab (float16 or uint8), as the page decodes it."""
    raw = base64.b64decode(slab["data"])
    if slab.get("compression") == "deflate":
        raw = zlib.decompress(raw)
    dtype = np.dtype("<f2") if slab["dtype"] == "float16" else np.dtype(np.uint8)
    return np.frombuffer(raw, dtype).reshape(slab["shape"])


def head_records(records: Sequence[dict[str, Any]], L: int, H: int) -> list[dict[str, Any]]:
    """One option's records in ``l*H + h`` order, with each metric formatted as the page shows it.

    Args:
        records: the option's ``metrics.json`` records.
        L: layers.
        H: heads per layer.

    Returns:
        ``{"n", "s", "num_queries", "num_dropped", "v": {metric: text}}`` per head; the text is
        ``format(value, METRIC_FORMAT)`` or ``"n/a"`` (a head without queries).

    Raises:
        JaxattnError: a (layer, head) is missing.
    """
    by = {(int(r["layer"]), int(r["head"])): r for r in records}
    out = []
    for l in range(L):
        for h in range(H):
            if (l, h) not in by:
                raise JaxattnError(f"no record for layer {l} head {h} (of {L} x {H})")
            r = by[(l, h)]
            out.append(
                {
                    "n": int(r["n"]),
                    "s": int(r["s"]),
                    "num_queries": int(r["num_queries"]),
                    "num_dropped": int(r.get("num_dropped", 0)),
                    "v": {m: format_value(r.get(m), METRIC_FORMAT) for m in METRIC_NAMES},
                }
            )
    return out


def _slot(pool: dict[bytes, int], slabs: list[Any], exact: np.ndarray, packed: Any) -> int:
    """The index of ``exact``'s slab in ``slabs`` (appending ``packed`` for an array not seen before)."""
    key = hashlib.blake2b(np.ascontiguousarray(exact).tobytes(), digest_size=16).digest()
    if key not in pool:
        pool[key] = len(slabs)
        slabs.append(packed)
    return pool[key]


@jax.jit
def _query_batch(expected: jax.Array, actual: jax.Array, mask: jax.Array) -> jax.Array:
    """[Q, b, T, T] x3 -> float32 [Q, b, T, M] per-query metrics (M = METRIC_NAMES)."""
    q = jax.vmap(jax.vmap(query_metrics))(expected, actual, mask)
    return jnp.stack([q[m] for m in METRIC_NAMES], -1)


def _query_metrics(
    expected: np.ndarray, mask: np.ndarray, actual: np.ndarray, combos: list[tuple[int, int, int]]
) -> np.ndarray:
    """Per-query metrics of each (pair, layer, head) combo: float32 [Q, b, T, M]."""
    out = []
    for start in range(0, len(combos), _QUERY_BATCH):
        chunk = combos[start : start + _QUERY_BATCH]
        chunk = chunk + [chunk[-1]] * (_QUERY_BATCH - len(chunk))  # a fixed batch: one compilation
        p, l, h = (np.array(c) for c in zip(*chunk))
        got = _query_batch(expected[p], np.moveaxis(actual[:, l, h], 0, 1), mask[p])
        out.append(np.asarray(got)[: len(combos) - start])
    return np.concatenate(out, 0)


def attention_data(
    expected: Float[ArrayLike, "P B T T"],
    mask: Shaped[ArrayLike, "P B T T"],
    pair_index: Shaped[ArrayLike, "L H"],
    attns: dict[str, Any],
    *,
    num_seqs: int = REPORT_SEQS,
    max_positions: int = REPORT_MAX_POSITIONS,
) -> dict[str, Any]:
    """The packed arrays of the report (see the module docstring) for one or more options.

    Args:
        expected: float32 [P, B, T, T] expected attention per distinct (n, s) table.
        mask: bool [P, B, T, T] valid query-key pairs (causal & valid query).
        pair_index: int [L, H] each head's table.
        attns: ``{option label: float32 [B, L, H, T, T] actual attention}``.
        num_seqs: sequences kept (the first ones).
        max_positions: positions kept (the first ones).

    Returns:
        ``{"B", "T", "arrays": {"expected", "valid", "actual", "query"}, "actual_slot",
        "query_slot", "query_metrics"}``.

    Raises:
        JaxattnError: the mask is not causal & valid-query (the page rebuilds it that way).
    """
    b = max(1, min(int(num_seqs), np.shape(expected)[1]))
    T = min(int(max_positions), np.shape(expected)[2])
    ex = np.asarray(expected)[:, :b, :T, :T].astype(np.float32)
    mk = np.asarray(mask)[:, :b, :T, :T].astype(bool)
    valid: np.ndarray = np.asarray(mk.any(-1))
    if not np.array_equal(mk, valid[..., None] & np.tril(np.ones((T, T), bool))):
        raise JaxattnError("the report needs a causal mask with whole query rows valid or not")
    pidx = np.asarray(pair_index)
    L, H = pidx.shape
    pool: dict[bytes, int] = {}
    slabs: list[tuple[np.ndarray, np.ndarray]] = []
    actual_slot: dict[str, list[int]] = {}
    query_slot: dict[str, list[int]] = {}
    query_keys: dict[tuple[int, int], int] = {}
    combos: dict[str, list[tuple[int, int, int, int]]] = {}  # label -> (query slot, pair, layer, head)
    cut: dict[str, np.ndarray] = {}
    for label, attn in attns.items():
        cut[label] = np.asarray(attn)[:b, :, :, :T, :T].astype(np.float32)
        packed, scales = quantise_rows(cut[label])  # [b, L, H, R], [b, L, H, T]
        actual_slot[label], query_slot[label], combos[label] = [], [], []
        for l in range(L):
            for h in range(H):
                s = _slot(pool, slabs, cut[label][:, l, h], (packed[:, l, h], scales[:, l, h]))
                actual_slot[label].append(s)
                key = (s, int(pidx[l, h]))
                if key not in query_keys:
                    query_keys[key] = len(query_keys)
                    combos[label].append((query_keys[key], int(pidx[l, h]), l, h))
                query_slot[label].append(query_keys[key])
    ex_q, ex_s = quantise_rows(ex)
    q = np.zeros((len(query_keys), b, T, len(METRIC_NAMES)), np.float32)
    for label, todo in combos.items():
        if todo:
            q[[c[0] for c in todo]] = _query_metrics(ex, mk, cut[label], [c[1:] for c in todo])
    return {
        "B": b,
        "T": T,
        "query_metrics": list(METRIC_NAMES),
        "actual_slot": actual_slot,
        "query_slot": query_slot,
        "arrays": {
            "expected": encode_slab(ex_q),
            "expected_scale": encode_slab(ex_s),
            "valid": encode_slab(np.asarray(valid, np.uint8)),
            "actual": encode_slab(np.stack([a for a, _ in slabs])),
            "actual_scale": encode_slab(np.stack([s for _, s in slabs])),
            "query": encode_slab(q),
        },
    }


def overview_data(records: Sequence[dict[str, Any]], options: Sequence[str], L: int, H: int) -> dict[str, Any]:
    """The overview's data: each option's formatted head records, one colour range per metric, shared heads.

    Args:
        records: every option's ``metrics.json`` records.
        options: the option labels, in order.
        L: layers.
        H: heads per layer.

    Returns:
        ``{"options", "L", "H", "metrics", "labels", "better", "ranges", "repeated", "heads"}``.
    """
    recs = list(records)
    first = [r for r in recs if r["option"] == options[0]] if options else []
    return {
        "options": list(options),
        "L": L,
        "H": H,
        "metrics": list(METRIC_NAMES),
        "labels": LABELS,
        "better": BETTER,
        "ranges": {m: list(v) for m, v in metric_ranges(recs).items()},
        "repeated": sorted([list(c) for c in repeated_cells(first)]),
        "heads": {opt: head_records([r for r in recs if r["option"] == opt], L, H) for opt in options},
    }
