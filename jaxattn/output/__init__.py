"""Everything a run writes: files, terminal tables, figures, ``metrics.json`` and saved artefacts.

Outside the pure core: these modules only read results.

* :mod:`~jaxattn.output.files`: the output directory, atomic writes, the one JSON conversion;
* :mod:`~jaxattn.output.tables`: fixed-width terminal tables and the run header;
* :mod:`~jaxattn.output.plots`: the figures (matplotlib);
* :mod:`~jaxattn.output.documents`: the ``metrics.json`` document and its provenance;
* :mod:`~jaxattn.output.artefacts`: saved count tables, weights and embeddings (safetensors + JSON);
* :mod:`~jaxattn.output.hf`: the HuggingFace GPT-2 export (``jaxattn export``);
* :mod:`~jaxattn.output.html_report`: ``report.html``, one self-contained page per run (its data:
  :mod:`~jaxattn.output.html_data`; its template, script and style: ``templates/``).
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
from jaxattn.output.hf import (
    DEFAULT_N_POSITIONS,
    GPT2_FILES,
    GPT2Checkpoint,
    check_gpt2_config,
    gpt2_config,
    gpt2_state_dict,
    hf_model_config,
    layout_heads,
    load_any_gpt2_checkpoint,
    load_gpt2_checkpoint,
    params_from_gpt2,
    save_gpt2_checkpoint,
    vocab_from_tokenizer,
)
from jaxattn.output.html_report import (
    REPORT_NAME,
    read_report_data,
    render_html,
    report_data,
    report_job,
    write_report,
    write_score_report,
)

__all__ = [
    "DEFAULT_N_POSITIONS",
    "FORMAT_VERSION",
    "GPT2_FILES",
    "GPT2Checkpoint",
    "REPORT_NAME",
    "artefact_info",
    "atomic_open",
    "check_gpt2_config",
    "ensure_out_dir",
    "environment_info",
    "gpt2_config",
    "gpt2_state_dict",
    "hf_model_config",
    "jsonable",
    "layout_heads",
    "load_embeddings",
    "load_any_gpt2_checkpoint",
    "load_gpt2_checkpoint",
    "load_params",
    "load_tables",
    "metrics_document",
    "params_from_gpt2",
    "read_report_data",
    "render_html",
    "report_data",
    "report_job",
    "save_embeddings",
    "save_gpt2_checkpoint",
    "save_params",
    "save_tables",
    "vocab_from_tokenizer",
    "write_json",
    "write_report",
    "write_score_report",
]
