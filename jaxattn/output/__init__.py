"""Everything a run writes: files, terminal tables, figures, ``metrics.json`` and saved artefacts.

Outside the pure core: these modules only read results.

* :mod:`~jaxattn.output.files`: the output directory, atomic writes, the one JSON conversion;
* :mod:`~jaxattn.output.tables`: fixed-width terminal tables and the run header;
* :mod:`~jaxattn.output.plots`: the figures (matplotlib);
* :mod:`~jaxattn.output.documents`: the ``metrics.json`` document and its provenance;
* :mod:`~jaxattn.output.artefacts`: saved count tables, weights and embeddings (safetensors + JSON).
"""

from jaxattn.output.artefacts import (
    FORMAT_VERSION,
    artefact_info,
    load_embeddings,
    load_params,
    load_tables,
    save_embeddings,
    save_params,
    save_tables,
)
from jaxattn.output.documents import environment_info, metrics_document
from jaxattn.output.files import atomic_open, ensure_out_dir, jsonable, write_json

__all__ = [
    "FORMAT_VERSION",
    "artefact_info",
    "atomic_open",
    "ensure_out_dir",
    "environment_info",
    "jsonable",
    "load_embeddings",
    "load_params",
    "load_tables",
    "metrics_document",
    "save_embeddings",
    "save_params",
    "save_tables",
    "write_json",
]
