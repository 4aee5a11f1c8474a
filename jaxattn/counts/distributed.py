"""Multi-process (multi-host) counting with JAX's multi-controller SPMD: exact reductions across processes.

Axis vocabulary: P processes, L devices per process used here, W words (int32) per process,
Z non-zero counts, K items (documents or files).

Each process runs the same program on its own share of the corpus (:func:`process_share`, whole
documents), counts it locally into sorted unique ``(keys, counts)`` runs, and the processes then
reduce exactly (:func:`allreduce_keyed`):

- *dense* tables (``V**(n+1)`` bins affordable, char level): every process scatters its runs into
  bins, and one jitted ``shard_map`` ``psum``s them over the ``"proc"`` axis of a global
  ``(P, L)`` mesh. Bins travel as int32; counts that might overflow int32 are split into base
  ``2**b`` digits (``P * 2**b <= 2**31``), summed digit by digit and recombined in int64 on the host.
- *sorted* tables (word level): the runs are all-gathered over the ``"proc"`` axis (padded to a
  common length) and merged on the host: a stable sort of the P sorted runs, then one int64 sum
  per distinct key.

Global arrays are built with ``jax.make_array_from_process_local_data`` from each process's own
data, and results are read from this process's addressable shards only: the output is laid out
``P(None, "local")``, so the L local devices of a process together hold all of it. No full host
array is ``device_put`` across processes, and no non-addressable data is fetched. int64 values
travel as pairs of int32 words (bit-exact), so nothing depends on ``jax_enable_x64``.

Every process must call these functions in the same order with the same table sets (the tables
and the vocabulary size are checked). With one process every function returns its input and makes
no distributed call.
"""

# ruff: noqa: F722  (jaxtyping shape strings such as "R V" are not Python expressions)
from __future__ import annotations

import functools
import json
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxattn.counts.kernels import DENSE_BINS_MAX
from jaxattn.counts.keys import INT32_MAX, INT64_MAX, key_dtype, merge_keyed_runs, shrink_counts
from jaxattn.errors import JaxattnError
from jaxattn.typing import Int, Integer

__all__ = [
    "allreduce_counts",
    "allreduce_int",
    "allreduce_keyed",
    "allreduce_sorted",
    "cluster_environment",
    "exclusive_prefix_sum",
    "init_distributed",
    "is_multiprocess",
    "process_mesh",
    "process_share",
]

#: Keyed tables: ``{(n, s): (keys, counts)}`` with sorted unique packed keys.
Keyed = dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]


def cluster_environment() -> str | None:
    """Names the multi-process launcher found in the environment (``"slurm"``, ``"openmpi"``), else None.

    These are the launchers whose settings ``jax.distributed.initialize()`` reads by itself. A
    single-task job (``SLURM_NTASKS=1``) counts as no cluster: there is nothing to coordinate.

    Returns:
        ``"slurm"``, ``"openmpi"`` or None.
    """
    env = os.environ
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(v in env for v in slurm) and _env_int("SLURM_NTASKS") > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and _env_int("OMPI_COMM_WORLD_SIZE", 2) > 1:
        return "openmpi"
    return None


def _env_int(name: str, default: int = 1) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _check_address(coordinator: str) -> None:
    """Refuses a coordinator that is not ``HOST:PORT`` (``[v6addr]:PORT`` for IPv6)."""
    host, sep, port = coordinator.rpartition(":")
    ok = bool(sep and host and host not in ("[]",) and port.isdigit() and 1 <= int(port) <= 65535)
    if ok and ":" in host and not (host.startswith("[") and host.endswith("]")):
        ok = False  # a bare IPv6 address is ambiguous: write [addr]:port
    if not ok:
        raise JaxattnError(
            f"coordinator={coordinator!r} is not HOST:PORT (e.g. 10.0.0.1:1234 or [::1]:1234, port in 1..65535)"
        )


def init_distributed(
    coordinator: str | None,
    num_processes: int | None,
    process_id: int | None,
    *,
    initialization_timeout: int = 300,
) -> tuple[int, int]:
    """Joins the JAX multi-controller run (``jax.distributed.initialize``); call before any JAX computation.

    Args:
        coordinator: ``HOST:PORT`` of process 0's coordinator service (the same on every process).
        num_processes: P, the number of processes.
        process_id: this process's index in ``[0, P)``.
        initialization_timeout: seconds to wait for the other processes.

    With all three None, a cluster launcher in the environment (SLURM, Open MPI; see
    :func:`cluster_environment`) lets JAX detect everything; without one, this is a single-process
    run and JAX is left alone. ``num_processes=1`` is also a single-process run.

    Returns:
        ``(process_index, process_count)``.

    Raises:
        JaxattnError: for a partial set of flags, a bad ``HOST:PORT``, a process id out of range,
            a call after JAX has started computing, or a failed connection.
    """
    import jax

    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    if all(v is None for v in given.values()):
        if cluster_environment() is None:
            return 0, 1
        return _initialize(jax, {"initialization_timeout": initialization_timeout})
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise JaxattnError(
            f"multi-process counting needs coordinator, num_processes and process_id together; "
            f"missing {', '.join(missing)} (given: {', '.join(k for k in given if k not in missing)})"
        )
    assert coordinator is not None and num_processes is not None and process_id is not None
    _check_address(str(coordinator))
    if int(num_processes) < 1:
        raise JaxattnError(f"num_processes={num_processes} must be >= 1")
    if not 0 <= int(process_id) < int(num_processes):
        raise JaxattnError(f"process_id={process_id} is not in [0, num_processes={num_processes})")
    if int(num_processes) == 1:
        return 0, 1
    kwargs = {
        "coordinator_address": str(coordinator),
        "num_processes": int(num_processes),
        "process_id": int(process_id),
        "initialization_timeout": int(initialization_timeout),
    }
    return _initialize(jax, kwargs)


def _initialize(jax: Any, kwargs: dict[str, Any]) -> tuple[int, int]:
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError, TypeError) as e:
        where = kwargs.get("coordinator_address", cluster_environment())
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JaxattnError(f"jax.distributed.initialize failed ({where}): {first}") from e
    return jax.process_index(), jax.process_count()


def is_multiprocess() -> bool:
    """Whether this is a multi-process run.

    Returns:
        True when JAX's distributed runtime is up with more than one process (no JAX backend is
        started otherwise).
    """
    import jax

    return bool(jax.distributed.is_initialized()) and jax.process_count() > 1


def process_share(sizes: Sequence[int], process_id: int, num_processes: int) -> range:
    """The contiguous range of items (documents or files) process ``process_id`` reads, balanced by size.

    Item k goes to process ``floor(P * (c_k + sizes[k] / 2) / T)``, where ``c_k`` is the size of
    the items before it and T the total: its midpoint decides. Owners never decrease with k, so
    each share is contiguous, every item is in exactly one share, and shares may be empty (more
    processes than items, or one huge item). With T = 0 items are split by count.

    Args:
        sizes: [K] non-negative sizes (bytes, tokens, ...).
        process_id: I in ``[0, P)``.
        num_processes: P >= 1.

    Returns:
        ``range(start, stop)`` of item indices.

    Raises:
        JaxattnError: for a negative size, P < 1 or I out of range.
    """
    p, i = int(num_processes), int(process_id)
    if p < 1:
        raise JaxattnError(f"num_processes={num_processes} must be >= 1")
    if not 0 <= i < p:
        raise JaxattnError(f"process_id={process_id} is not in [0, num_processes={num_processes})")
    sz = [int(x) for x in sizes]
    if any(x < 0 for x in sz):
        raise JaxattnError(f"sizes must be >= 0, got {min(sz)}")
    if not sz:
        return range(0, 0)
    total = sum(sz)
    if total == 0:
        sz, total = [1] * len(sz), len(sz)
    owners, before = [], 0
    for x in sz:  # exact integer arithmetic: 2 * midpoint * P // (2 * T)
        owners.append(min(p - 1, (p * (2 * before + x)) // (2 * total)))
        before += x
    start = next((k for k, o in enumerate(owners) if o >= i), len(sz))
    stop = next((k for k, o in enumerate(owners) if o >= i + 1), len(sz))
    return range(start, stop)


@functools.cache
def process_mesh() -> Any:
    """The global ``(P, L)`` mesh ``("proc", "local")``: row p holds L devices of process p.

    L is the smallest local device count over the processes (the first L of each by id).

    Returns:
        The ``jax.sharding.Mesh`` of shape (P, L).
    """
    import jax
    from jax.sharding import Mesh

    by_proc: dict[int, list[Any]] = {}
    for d in jax.devices():
        by_proc.setdefault(int(d.process_index), []).append(d)
    count = jax.process_count()
    if sorted(by_proc) != list(range(count)):
        raise JaxattnError(f"devices are reported for processes {sorted(by_proc)}, expected 0..{count - 1}")
    local = min(len(v) for v in by_proc.values())
    rows = [sorted(by_proc[p], key=lambda d: d.id)[:local] for p in range(count)]
    return Mesh(np.array(rows, dtype=object), ("proc", "local"))


@functools.cache
def _collective(mesh: Any, width: int, kind: str) -> Any:
    """Jitted ``[P, W] -> [1, W]`` psum or ``[P, W] -> [P, W]`` all-gather over ``"proc"``, out ``P(None, "local")``."""
    import jax
    from jax.sharding import PartitionSpec as P

    def local(x: Any) -> Any:
        if kind == "sum":
            return jax.lax.psum(x, "proc")
        return jax.lax.all_gather(x, "proc", axis=0, tiled=True)

    # all_gather's result is the same on every "proc" row, but its type says "varying": skip that check.
    f = jax.shard_map(
        local, mesh=mesh, in_specs=P("proc", "local"), out_specs=P(None, "local"), check_vma=kind == "sum"
    )
    return jax.jit(f)


def _padded_width(length: int, local: int) -> int:
    """Width >= length, a multiple of ``local``, with few distinct values (so few compiles): <= 12.5% waste."""
    w = max(int(length), 1)
    step = max(1 << max(w.bit_length() - 4, 0), 1)
    w = -(-w // step) * step
    return -(-w // local) * local


def _exchange(words: Int[np.ndarray, " W"], kind: str, width: int) -> Int[np.ndarray, "R W2"]:
    """Runs the collective on this process's int32 ``words`` (zero-padded to ``width``); result from local shards.

    Returns:
        int32 [1, width'] (``kind="sum"``) or [P, width'] (``"gather"``), ``width' >= width``.
    """
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = process_mesh()
    nproc, nloc = mesh.devices.shape
    w = _padded_width(width, nloc)
    buf = np.zeros((1, w), np.int32)
    buf[0, : words.shape[0]] = words
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("proc", "local")), buf, (nproc, w))
    out = _collective(mesh, w, kind)(x)
    shards = out.addressable_shards
    if len(shards) == 1 and shards[0].data.shape == out.shape:  # one local device: no reassembly copy
        return np.asarray(shards[0].data)
    res = np.empty(out.shape, np.int32)
    covered = 0
    for sh in shards:
        part = np.asarray(sh.data)
        res[sh.index] = part
        covered += part.size
    if covered < res.size:  # a process's devices hold every column at least once (see process_mesh)
        raise JaxattnError(f"collective result not covered by this process's shards ({covered} of {res.size})")
    return res


def _words(values: Integer[np.ndarray, " K"]) -> Int[np.ndarray, " W"]:
    """int64 values as int32 words, 2 per value (bit-exact)."""
    return np.ascontiguousarray(values, dtype=np.int64).view(np.int32)


def _gather_int64(values: Integer[np.ndarray, " K"]) -> Int[np.ndarray, "P K"]:
    """All processes' int64 [K] (the same K everywhere) -> int64 [P, K]."""
    k = int(values.shape[0])
    got = _exchange(_words(values), "gather", 2 * k)
    return np.ascontiguousarray(got[:, : 2 * k]).view(np.int64)


def allreduce_int(value: int, op: str) -> int:
    """The sum, max or min of one integer over all processes (exact, any int64).

    Args:
        value: this process's value.
        op: ``"sum"``, ``"max"`` or ``"min"``.

    Returns:
        The reduced value, the same on every process (``value`` itself with one process).

    Raises:
        JaxattnError: for another op, or a value (or sum) outside int64.
    """
    reducers: dict[str, Callable[[list[int]], int]] = {"sum": sum, "max": max, "min": min}
    if op not in reducers:
        raise JaxattnError(f"op={op!r} is not one of sum, max, min")
    v = int(value)
    if not -INT64_MAX - 1 <= v <= INT64_MAX:
        raise JaxattnError(f"value={value} does not fit int64")
    if not is_multiprocess():
        return v
    out = int(reducers[op]([int(x) for x in _gather_int64(np.array([v], np.int64))[:, 0]]))
    if not -INT64_MAX - 1 <= out <= INT64_MAX:
        raise JaxattnError(f"allreduce_int sum {out} does not fit int64")
    return out


def exclusive_prefix_sum(value: int) -> int:
    """Sum of ``value`` over the processes before this one: global offsets (e.g. of document ids).

    Args:
        value: this process's value (e.g. its number of documents).

    Returns:
        The sum over processes ``0 .. I-1`` (0 on process 0 and with one process).
    """
    v = int(value)
    if not is_multiprocess():
        return 0
    import jax

    allv = _gather_int64(np.array([v], np.int64))[:, 0]
    return int(sum(int(x) for x in allv[: jax.process_index()]))


def _gather_bytes(payload: bytes) -> list[bytes]:
    """Every process's byte string, in process order."""
    lengths = _gather_int64(np.array([len(payload)], np.int64))[:, 0]
    width = -(-int(lengths.max()) // 4)
    buf = np.zeros(width * 4, np.uint8)
    buf[: len(payload)] = np.frombuffer(payload, np.uint8)
    got = _exchange(buf.view(np.int32), "gather", width)
    return [got[p, :width].tobytes()[: int(n)] for p, n in enumerate(lengths)]


def allreduce_counts(type_counts: Mapping[str, int]) -> dict[str, int]:
    """Sums string -> count maps (e.g. vocabulary counts) over all processes, exactly.

    The strings travel as UTF-8 JSON bytes. The result lists the strings in process order, each
    process's in its own order (first-seen order over the whole corpus when shares are contiguous
    and each map is in first-seen order), so every process gets the same dict.

    Args:
        type_counts: this process's counts (str keys, int values).

    Returns:
        The global counts, the same on every process.
    """
    items = [(str(k), int(v)) for k, v in type_counts.items()]
    if not is_multiprocess():
        return dict(items)
    out: dict[str, int] = {}
    for blob in _gather_bytes(json.dumps(items).encode("utf-8")):
        for k, v in json.loads(blob.decode("utf-8")):
            out[k] = out.get(k, 0) + int(v)
    return out


def _agree(keyed: Keyed, vocab_size: int) -> list[tuple[int, int]]:
    """The sorted table list, after checking that every process has the same tables and V."""
    tables = sorted((int(n), int(s)) for n, s in keyed)
    sig = np.array([zlib.crc32(repr(tables).encode()), len(tables), int(vocab_size)], np.int64)
    allsig = _gather_int64(sig)
    bad = [p for p in range(allsig.shape[0]) if not np.array_equal(allsig[p], allsig[0])]
    if bad:
        raise JaxattnError(
            f"allreduce_keyed: process {bad[0]} has other tables or vocab_size than process 0 "
            f"(here {len(tables)} tables {tables[:4]}..., vocab_size={vocab_size})"
        )
    return tables


def allreduce_sorted(
    keys: Integer[np.ndarray, " Z"], counts: Integer[np.ndarray, " Z"]
) -> tuple[Integer[np.ndarray, " Z2"], Int[np.ndarray, " Z2"]]:
    """Exact merge-sum of every process's sorted unique ``(keys, counts)`` (all-gather, then merge on the host).

    Args:
        keys: int32/int64 [Z] sorted unique keys (the same dtype on every process).
        counts: int [Z] counts.

    Returns:
        keys (this dtype) [Z2] sorted unique and int64 counts [Z2], the same on every process.
    """
    k = np.asarray(keys)
    if not is_multiprocess():
        return k, np.asarray(counts).astype(np.int64)
    lengths = _gather_int64(np.array([k.shape[0]], np.int64))[:, 0]
    width = int(lengths.max())
    pair = np.zeros((2, width), np.int64)
    pair[0, : k.shape[0]] = k
    pair[1, : k.shape[0]] = counts
    got = _exchange(_words(pair.reshape(-1)), "gather", 4 * width)
    rows = [got[p, : 4 * width].view(np.int64) for p in range(got.shape[0])]  # [keys | counts], no copies
    runs = [
        (r[: int(n)].astype(k.dtype, copy=False), r[width : width + int(n)]) for r, n in zip(rows, lengths, strict=True)
    ]
    return merge_keyed_runs(runs)


def _digit_bits(nproc: int) -> int:
    """Bits b per int32 digit such that P digits of ``2**b - 1`` sum below ``2**31``."""
    return 31 - (nproc - 1).bit_length()


def _dense_allreduce(keyed: Keyed, tables: list[tuple[int, int]], vocab_size: int) -> Keyed:
    """psum of the bins of every dense table at once (one collective), digit-split when int32 could overflow."""
    nbins = [vocab_size ** (n + 1) for n, _ in tables]
    offsets = np.concatenate([[0], np.cumsum(nbins)]).astype(np.int64)
    bins = np.zeros(int(offsets[-1]), np.int64)
    for (n, s), off in zip(tables, offsets[:-1], strict=False):
        k, v = keyed[(n, s)]
        bins[int(off) + np.asarray(k, np.int64)] += np.asarray(v, np.int64)
    local_max = int(bins.max()) if bins.size else 0
    nproc = process_mesh().devices.shape[0]
    b = _digit_bits(nproc)
    top = allreduce_int(local_max, "max")
    ndig = 1 if nproc * top <= INT32_MAX else -(-max(top.bit_length(), 1) // b)
    mask = (1 << b) - 1
    digits = [((bins >> (b * d)) & mask) if ndig > 1 else bins for d in range(ndig)]
    words = np.concatenate(digits).astype(np.int32)
    summed = _exchange(words, "sum", words.shape[0])[0, : words.shape[0]].astype(np.int64)
    total = np.zeros(bins.shape[0], np.int64)
    for d in range(ndig):
        total += summed[d * bins.shape[0] : (d + 1) * bins.shape[0]] << (b * d if ndig > 1 else 0)
    out: Keyed = {}
    for (n, s), off, nb in zip(tables, offsets[:-1], nbins, strict=False):
        seg = total[int(off) : int(off) + nb]
        k = np.flatnonzero(seg)
        out[(n, s)] = (k.astype(key_dtype(vocab_size, n)), seg[k])
    return out


def allreduce_keyed(keyed: Keyed, vocab_size: int) -> Keyed:
    """Exact sum over processes of per-table sorted unique ``(keys, counts)`` runs; the result on every process.

    Tables whose key space ``V**(n+1)`` is at most ``DENSE_BINS_MAX`` are psum-ed as dense bins
    (all in one collective); the others are all-gathered and merged (:func:`allreduce_sorted`).

    Args:
        keyed: ``{(n, s): (keys, counts)}``: keys int32/int64 [Z] packed ``context * V + target``,
            sorted ascending and unique (see :func:`jaxattn.counts.keys.pack_ngrams`), counts int [Z].
            Every process passes the same tables (arrays may be empty).
        vocab_size: V, the same on every process.

    Returns:
        The same tables summed over all processes: keys of :func:`~jaxattn.counts.keys.key_dtype`
        sorted unique, counts > 0 (int32, or int64 when one exceeds int32, as single-process counting
        gives them). With one process, ``keyed`` itself.

    Raises:
        JaxattnError: when the processes disagree on the tables or V.
    """
    if not is_multiprocess():
        return keyed
    v = int(vocab_size)
    tables = _agree(keyed, v)
    dense = [t for t in tables if v ** (t[0] + 1) <= DENSE_BINS_MAX]
    out = _dense_allreduce(keyed, dense, v) if dense else {}
    for n, s in tables:
        if (n, s) not in out:
            k, c = keyed[(n, s)]
            out[(n, s)] = allreduce_sorted(np.asarray(k).astype(key_dtype(v, n)), c)
    # Counts as single-process counting stores them: int32, int64 only where one overflows int32.
    return {t: (out[t][0], shrink_counts(out[t][1])) for t in keyed}
