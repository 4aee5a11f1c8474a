"""Saved artefacts: count tables, derived weights with their config, and trained embeddings.

Counting is the slow, corpus-sized step of a run; deriving and evaluating are cheap by
comparison. Saving the tables once lets later runs (``jaxattn analyze --load DIR``) skip it.

Format (version 1)
------------------
An artefact directory holds up to three *artefacts*. Each is a pair of files:

* ``<kind>.safetensors``: the arrays, in the `safetensors <https://github.com/huggingface/safetensors>`_
  format (a JSON header, then raw little-endian array bytes; no pickle, safe to load from
  anywhere). Its header metadata holds ``{"format": "jaxattn.<kind>", "version": "1"}``.
* ``<kind>.json``: a JSON sidecar with everything that is not an array, plus the sha256
  of the ``.safetensors`` file. The sidecar is written *last*, so its presence marks a
  complete artefact; both files are written atomically (temporary file, then rename).

The three kinds:

``tables`` (:func:`save_tables` / :func:`load_tables`)
    One entry per count table ``C^{n,s}``, under the prefix ``"n{n}_s{s}/"``:
    ``contexts`` int32 [R, n], ``rows`` int32 [Z], ``cols`` int32 [Z], ``values`` int32
    or int64 [Z] (exactly the :class:`~jaxattn.counts.CountMatrix` fields). The sidecar
    holds ``vocab_size``, a list of ``{"n", "s", "num_contexts", "nnz", "num_windows"}``,
    the tokenizer (``Tokenizer.to_dict()``) and the count corpus's ``Corpus.info()``
    (source, file names, sha256), when given.
``params`` (:func:`save_params` / :func:`load_params`)
    Every leaf of the parameter pytree under its key (nested dicts joined with ``"/"``),
    e.g. ``embed`` [V, D], ``wq`` [L, H, D, K]. The sidecar holds the
    :class:`~jaxattn.model.ModelConfig` (``config``) and free-form ``info``.
``embeddings`` (:func:`save_embeddings` / :func:`load_embeddings`)
    Named embedding matrices, e.g. Option 4's trained ``embed`` [V, D]; the sidecar holds
    an optional ModelConfig and free-form ``info`` (training settings, curves, ...).

Every sidecar also records ``format``, ``version``, ``jaxattn_version`` and, per array,
its dtype and shape. Round trips are exact: arrays come back bit-identical, with their
dtypes.

Loading checks the sidecar, the sha256, every array's dtype and shape against the sidecar
and, for tables, the invariants of a :class:`~jaxattn.counts.CountMatrix` (sorted unique
contexts, sorted COO entries in range, positive counts summing to ``num_windows``). Any
problem is a :class:`~jaxattn.errors.JaxattnError` naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jaxattn.counts import CountMatrix, key_dtype, pack_ngrams
from jaxattn.errors import JaxattnError
from jaxattn.model import ModelConfig
from jaxattn.output.files import atomic_open, ensure_out_dir, jsonable
from jaxattn.version import VERSION

__all__ = [
    "FORMAT_VERSION",
    "artefact_info",
    "load_embeddings",
    "load_params",
    "load_tables",
    "save_embeddings",
    "save_params",
    "save_tables",
]

#: Version of the on-disk format written by this module (readers accept <= this).
FORMAT_VERSION = 1

_KINDS = ("tables", "params", "embeddings")


# --------------------------------------------------------------------------- #
# Generic artefact files
# --------------------------------------------------------------------------- #


def _paths(directory: str | os.PathLike[str], kind: str) -> tuple[Path, Path]:
    d = Path(directory)
    return d / f"{kind}.safetensors", d / f"{kind}.json"


def _save_artefact(
    directory: str | os.PathLike[str], kind: str, arrays: Mapping[str, np.ndarray], sidecar: dict[str, Any]
) -> Path:
    """Writes ``<kind>.safetensors`` then ``<kind>.json`` atomically; returns the directory."""
    out = ensure_out_dir(directory)
    arr_path, json_path = _paths(out, kind)
    # safetensors wants C-contiguous numpy arrays; jax arrays are copied to host here.
    host = {name: np.ascontiguousarray(np.asarray(a)) for name, a in arrays.items()}
    header = _safetensors_header(host, {"format": f"jaxattn.{kind}", "version": str(FORMAT_VERSION)}, kind)
    doc = {
        "format": f"jaxattn.{kind}",
        "version": FORMAT_VERSION,
        "jaxattn_version": VERSION,
        "arrays_file": arr_path.name,
        "sha256": "",
        "arrays": {name: {"dtype": a.dtype.str, "shape": list(a.shape)} for name, a in host.items()},
        **sidecar,
    }
    try:  # before touching the disk: numpy scalars become numbers, non-finite floats null
        json.dumps(jsonable(doc, strict=True), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise JaxattnError(f"cannot save {kind}: the metadata is not JSON-able ({e})") from None
    digest = hashlib.sha256()
    with atomic_open(arr_path, "wb") as f:
        # Streamed, array by array: the file is never held in memory a second time (word-level
        # tables are gigabytes).
        digest.update(header)
        f.write(header)
        for name in sorted(host):
            raw = host[name].reshape(-1).view(np.uint8)
            digest.update(raw.data)
            f.write(raw.data)
    doc["sha256"] = digest.hexdigest()
    text = json.dumps(jsonable(doc, strict=True), indent=1, allow_nan=False) + "\n"
    with atomic_open(json_path, "w") as f:  # last: its presence marks a complete artefact
        f.write(text)
    return out


#: numpy dtype -> safetensors dtype name.
_ST_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32", "int16": "I16",
    "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip


def _safetensors_header(host: Mapping[str, np.ndarray], metadata: dict[str, str], kind: str) -> bytes:
    """The safetensors header (8-byte little-endian length, then JSON) for ``host`` written in name order.

    Raises:
        JaxattnError: a dtype safetensors has no name for here (e.g. bfloat16).
    """
    entries: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in sorted(host):
        a = host[name]
        code = _ST_DTYPES.get(a.dtype.name)
        if code is None or a.dtype.byteorder == ">":
            raise JaxattnError(f"cannot save {kind} arrays in safetensors format: array {name!r} has dtype {a.dtype}")
        entries[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)  # the data starts 8-byte aligned
    return len(body).to_bytes(8, "little") + body


def artefact_info(directory: str | os.PathLike[str], kind: str) -> dict[str, Any]:
    """Reads and checks the JSON sidecar of one artefact.

    Args:
        directory: the artefact directory.
        kind: ``"tables"``, ``"params"`` or ``"embeddings"``.

    Returns:
        The sidecar as a dict (see the module docstring).

    Raises:
        JaxattnError: no such directory or artefact, unreadable or malformed JSON, another
            format, or a newer format version.
    """
    if kind not in _KINDS:
        raise JaxattnError(f"unknown artefact kind {kind!r}; expected one of {', '.join(_KINDS)}")
    d = Path(directory)
    if not d.is_dir():
        raise JaxattnError(f"artefact directory does not exist: {str(d)!r}")
    _, json_path = _paths(d, kind)
    if not json_path.is_file():
        raise JaxattnError(f"no saved {kind} in {str(d)!r} (missing {json_path.name})")
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JaxattnError(f"cannot read {json_path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != f"jaxattn.{kind}":
        raise JaxattnError(f"{json_path} is not a jaxattn {kind} sidecar (format {_get(doc, 'format')!r})")
    version = doc.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise JaxattnError(
            f"{json_path} has format version {version!r}; this jaxattn reads versions 1..{FORMAT_VERSION}"
        )
    if not isinstance(doc.get("arrays"), dict) or not isinstance(doc.get("sha256"), str):
        raise JaxattnError(f"{json_path} is malformed: missing 'arrays' or 'sha256'")
    return doc


def _get(doc: Any, key: str) -> Any:
    return doc.get(key) if isinstance(doc, dict) else None


def _load_artefact(directory: str | os.PathLike[str], kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reads one artefact's arrays (checked against the sidecar) and its sidecar."""
    doc = artefact_info(directory, kind)
    arr_path, json_path = _paths(directory, kind)
    # Hashed in blocks and read array by array: a large artefact is never in memory twice.
    digest = hashlib.sha256()
    try:
        with open(arr_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    except OSError as e:
        raise JaxattnError(f"cannot read {arr_path}: {e.strerror or e}") from None
    if digest.hexdigest() != doc["sha256"]:
        raise JaxattnError(f"{arr_path} does not match the sha256 in {json_path.name} (truncated or changed on disk)")
    try:
        with safe_open(str(arr_path), framework="numpy") as st:
            arrays = {name: st.get_tensor(name) for name in st.keys()}  # noqa: SIM118  (safe_open has no __iter__)
    except Exception as e:  # safetensors raises its own error types on a bad header
        raise JaxattnError(f"cannot parse {arr_path}: {e}") from None
    want = doc["arrays"]
    if set(arrays) != set(want):
        raise JaxattnError(f"{arr_path} holds arrays {sorted(arrays)}, but {json_path.name} lists {sorted(want)}")
    for name, a in arrays.items():
        spec = want[name]
        if (
            not isinstance(spec, dict)
            or np.dtype(a.dtype).str != spec.get("dtype")
            or list(a.shape) != spec.get("shape")
        ):
            raise JaxattnError(f"{arr_path}: array {name!r} is {a.dtype}{list(a.shape)}, the sidecar says {spec}")
    return arrays, doc


# --------------------------------------------------------------------------- #
# Count tables
# --------------------------------------------------------------------------- #


def _table_prefix(n: int, s: int) -> str:
    return f"n{n}_s{s}/"


def save_tables(
    directory: str | os.PathLike[str],
    tables: Mapping[tuple[int, int], CountMatrix],
    *,
    tokenizer: Any = None,
    corpus: Any = None,
) -> Path:
    """Saves count tables (the ``tables`` artefact; see the module docstring).

    Args:
        directory: created if missing; ``tables.safetensors`` and ``tables.json`` are
            replaced atomically.
        tables: ``{(n, s): CountMatrix}``, all with the same ``vocab_size``.
        tokenizer: optional :class:`~jaxattn.corpus.Tokenizer` the tokens came from;
            :func:`load_tables` can then check a corpus's vocabulary against it.
        corpus: optional :class:`~jaxattn.corpus.Corpus` (or its ``info()`` dict) counted,
            recorded for provenance (source, files, sha256).

    Returns:
        The directory.

    Raises:
        JaxattnError: no tables, mixed vocabulary sizes, or an unwritable directory.
    """
    if not tables:
        raise JaxattnError("no count tables to save")
    vocab = {int(cm.vocab_size) for cm in tables.values()}
    if len(vocab) != 1:
        raise JaxattnError(f"count tables to save have different vocabulary sizes {sorted(vocab)}")
    arrays: dict[str, np.ndarray] = {}
    entries = []
    for (n, s), cm in sorted(tables.items()):
        if (int(cm.n), int(cm.s)) != (int(n), int(s)):
            raise JaxattnError(f"table stored under (n, s)=({n}, {s}) is C^({cm.n},{cm.s})")
        p = _table_prefix(cm.n, cm.s)
        arrays[p + "contexts"] = np.asarray(cm.contexts)
        arrays[p + "rows"] = np.asarray(cm.rows)
        arrays[p + "cols"] = np.asarray(cm.cols)
        arrays[p + "values"] = np.asarray(cm.values)
        entries.append(
            {"n": cm.n, "s": cm.s, "num_contexts": cm.num_contexts, "nnz": cm.nnz, "num_windows": int(cm.num_windows)}
        )
    sidecar: dict[str, Any] = {"vocab_size": vocab.pop(), "tables": entries}
    if tokenizer is not None:
        sidecar["tokenizer"] = tokenizer.to_dict()
    if corpus is not None:
        sidecar["corpus"] = corpus if isinstance(corpus, dict) else corpus.info()
    return _save_artefact(directory, "tables", arrays, sidecar)


def load_tables(
    directory: str | os.PathLike[str],
    *,
    corpus: Any = None,
    vocab_size: int | None = None,
    tokenizer: Any = None,
    max_dense_bytes: int | None = None,
) -> dict[tuple[int, int], CountMatrix]:
    """Loads count tables saved by :func:`save_tables`, checked and bit-identical.

    Args:
        directory: the artefact directory.
        corpus: the :class:`~jaxattn.corpus.Corpus` the tables will be used with: shorthand for
            ``vocab_size=corpus.vocab_size, tokenizer=corpus.tokenizer``, plus a warning when
            the tables record another corpus (sha256), e.g. reused tables from a larger corpus.
        vocab_size: when given, the tables must have been counted with this V.
        tokenizer: when given (a :class:`~jaxattn.corpus.Tokenizer`) and the tables
            recorded theirs, both vocabularies must be identical (same ids for the same
            tokens), else the loaded counts would describe other tokens.
        max_dense_bytes: dense-size budget set on every loaded :class:`CountMatrix`.

    Returns:
        ``{(n, s): CountMatrix}``.

    Raises:
        JaxattnError: a missing, corrupt or inconsistent artefact, or tables that do not
            match ``vocab_size``/``tokenizer``.
    """
    doc = artefact_info(directory, "tables")
    where = f"tables in {str(directory)!r}"
    V = _check_tables_match(doc, where, corpus, vocab_size, tokenizer)
    arrays, doc = _load_artefact(directory, "tables")
    entries = doc.get("tables")
    if not isinstance(entries, list) or not entries:
        raise JaxattnError(f"{where}: tables.json lists no tables")
    out: dict[tuple[int, int], CountMatrix] = {}
    for e in entries:
        try:
            n, s, num_windows = int(e["n"]), int(e["s"]), int(e["num_windows"])
        except (KeyError, TypeError, ValueError):
            raise JaxattnError(f"{where}: malformed table entry {e!r}") from None
        p = _table_prefix(n, s)
        try:
            cm = CountMatrix(
                n=n,
                s=s,
                vocab_size=V,
                contexts=arrays[p + "contexts"],
                rows=arrays[p + "rows"],
                cols=arrays[p + "cols"],
                values=arrays[p + "values"],
                num_windows=num_windows,
                max_dense_bytes=max_dense_bytes,
            )
        except KeyError as k:
            raise JaxattnError(f"{where}: array {k} of C^({n},{s}) is missing") from None
        _check_table(cm, f"{where}: C^({n},{s})")
        out[(n, s)] = cm
    return out


def _check_tables_match(doc: dict[str, Any], where: str, corpus: Any, vocab_size: int | None, tokenizer: Any) -> int:
    """Checks a tables sidecar against the corpus they will be used with; returns its vocab_size."""
    V = doc.get("vocab_size")
    if corpus is not None:
        vocab_size = corpus.vocab_size if vocab_size is None else vocab_size
        tokenizer = corpus.tokenizer if tokenizer is None else tokenizer
        saved_sha = _get(doc.get("corpus"), "sha256")
        if saved_sha is not None and saved_sha != corpus.sha256:
            warnings.warn(
                f"{where} were counted on another corpus ({_get(doc['corpus'], 'source')!r}, sha256 "
                f"{str(saved_sha)[:12]}...) than {corpus.source!r} (sha256 {corpus.sha256[:12]}...)",
                stacklevel=3,
            )
    if not isinstance(V, int) or V < 1:
        raise JaxattnError(f"{where}: bad vocab_size {V!r} in tables.json")
    if vocab_size is not None and int(vocab_size) != V:
        raise JaxattnError(
            f"{where} were counted with vocab_size={V}, but the corpus has vocab_size={int(vocab_size)} "
            "(another corpus, tokenizer or --max-vocab?)"
        )
    saved_tok = doc.get("tokenizer")
    if tokenizer is not None and isinstance(saved_tok, dict):
        if saved_tok.get("kind") != tokenizer.kind or list(saved_tok.get("vocab", [])) != list(tokenizer.vocab):
            raise JaxattnError(
                f"{where} were counted with a different {saved_tok.get('kind')!r} vocabulary than the corpus's "
                f"{tokenizer.kind!r} tokenizer (same size {V}, different tokens or order)"
            )
    return V


def _check_table(cm: CountMatrix, what: str) -> None:
    """The CountMatrix invariants, in O(Z): cheap next to counting, and catches hand-edited files."""
    n, V = cm.n, cm.vocab_size
    c, r, k, v = cm.contexts, cm.rows, cm.cols, cm.values
    if n < 1 or cm.s < 0:
        raise JaxattnError(f"{what}: bad n or s")
    if c.dtype != np.int32 or c.ndim != 2 or c.shape[1] != n:
        raise JaxattnError(f"{what}: contexts must be int32 [R, {n}], got {c.dtype}{list(c.shape)}")
    if r.dtype != np.int32 or k.dtype != np.int32 or v.dtype not in (np.int32, np.int64):
        raise JaxattnError(f"{what}: rows/cols must be int32 and values int32/int64")
    if not (r.ndim == k.ndim == v.ndim == 1 and r.shape == k.shape == v.shape):
        raise JaxattnError(f"{what}: rows, cols and values must be 1-D of one length")
    R, Z = c.shape[0], v.shape[0]
    if Z and (c.min() < 0 or c.max() >= V or k.min() < 0 or k.max() >= V):
        raise JaxattnError(f"{what}: token ids outside [0, vocab_size={V})")
    if Z and (r.min() < 0 or r.max() >= R or v.min() <= 0):
        raise JaxattnError(f"{what}: row index out of range or a non-positive count")
    ckeys = pack_ngrams(c, V, key_dtype(V, n))
    if R > 1 and not np.all(ckeys[1:] > ckeys[:-1]):
        raise JaxattnError(f"{what}: contexts are not sorted and unique")
    entry = r.astype(np.int64) * V + k
    if Z > 1 and not np.all(entry[1:] > entry[:-1]):
        raise JaxattnError(f"{what}: entries are not sorted by row, then column, or repeat")
    # rows are non-decreasing (checked above): every context has a count iff they step by 0 or 1 from 0 to R-1.
    if (Z == 0) != (R == 0) or (Z and (r[0] != 0 or r[-1] != R - 1 or np.diff(r).max(initial=0) > 1)):
        raise JaxattnError(f"{what}: a context has no counts")
    if int(v.sum(dtype=np.int64)) != int(cm.num_windows):
        raise JaxattnError(f"{what}: counts sum to {int(v.sum(dtype=np.int64))}, not num_windows={cm.num_windows}")


# --------------------------------------------------------------------------- #
# Derived weights and embeddings
# --------------------------------------------------------------------------- #


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key, val in tree.items():
        if not isinstance(key, str) or not key or "/" in key:
            raise JaxattnError(f"parameter names must be non-empty strings without '/', got {key!r}")
        if isinstance(val, Mapping):
            out.update(_flatten(val, prefix + key + "/"))
        else:
            out[prefix + key] = np.asarray(val)
    return out


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, a in flat.items():
        *parents, leaf = name.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(a)
    return out


def save_params(
    directory: str | os.PathLike[str],
    params: Mapping[str, Any],
    config: Any,
    *,
    info: dict[str, Any] | None = None,
) -> Path:
    """Saves a parameter pytree with its model config (the ``params`` artefact).

    Args:
        directory: created if missing.
        params: ``{name: array}`` (numpy or jax; nested dicts allowed), e.g. the output
            of :func:`jaxattn.derive.derive_params`: ``embed`` [V, D], ``wq`` [L, H, D, K], ...
        config: the :class:`~jaxattn.model.ModelConfig` the weights belong to.
        info: optional JSON-able provenance (option, seed, corpus sha256, ...).

    Returns:
        The directory.

    Raises:
        JaxattnError: bad names, unsupported dtypes, or an unwritable directory.
    """
    return _save_artefact(directory, "params", _flatten(params), {"config": config.to_dict(), "info": dict(info or {})})


def _config_from_dict(d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise JaxattnError(f"{where}: no model config recorded")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise JaxattnError(f"{where}: unknown ModelConfig fields {unknown} (saved by a newer jaxattn?)")
    return ModelConfig(**d)


def load_params(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], Any]:
    """Loads a parameter pytree and its config saved by :func:`save_params`.

    Args:
        directory: the artefact directory.

    Returns:
        ``(params, config)``: the pytree of jax arrays (bit-identical to what was saved)
        and the :class:`~jaxattn.model.ModelConfig`.

    Raises:
        JaxattnError: a missing, corrupt or inconsistent artefact.
    """
    arrays, doc = _load_artefact(directory, "params")
    config = _config_from_dict(doc.get("config"), f"params in {str(directory)!r}")
    return _unflatten(arrays), config


def save_embeddings(
    directory: str | os.PathLike[str],
    embeddings: Any,
    *,
    config: Any = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Saves embedding matrices, e.g. Option 4's trained ones (the ``embeddings`` artefact).

    Args:
        directory: created if missing.
        embeddings: one float [V, D] array (saved as ``"embed"``) or ``{name: array}``.
        config: optional :class:`~jaxattn.model.ModelConfig` they belong to.
        info: optional JSON-able details (training steps, objective, curves, ...).

    Returns:
        The directory.

    Raises:
        JaxattnError: bad names, unsupported dtypes, or an unwritable directory.
    """
    arrays = _flatten(embeddings if isinstance(embeddings, Mapping) else {"embed": embeddings})
    sidecar = {"config": config.to_dict() if config is not None else None, "info": dict(info or {})}
    return _save_artefact(directory, "embeddings", arrays, sidecar)


def load_embeddings(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Loads embedding matrices saved by :func:`save_embeddings`.

    Args:
        directory: the artefact directory.

    Returns:
        ``{name: jax.Array}``, bit-identical to what was saved (``"embed"`` [V, D] for a
        single matrix). The sidecar (config, info) is :func:`artefact_info` ``(dir, "embeddings")``.

    Raises:
        JaxattnError: a missing, corrupt or inconsistent artefact.
    """
    arrays, _ = _load_artefact(directory, "embeddings")
    return _unflatten(arrays)
