"""The solution options (SPEC §3), one module each, reached through one registry.

* ``"baseline"``: the seed derivation, unchanged (:func:`jaxattn.pipeline.run_baseline`);
* ``"1"``, :mod:`.ppmi`: PPMI + SVD token embeddings under the seed derivation;
* ``"2"``, :mod:`.direct`: attention logits gathered from the count tables (the ceiling);
* ``"3"``, :mod:`.gpt2`: a standard GPT-2 whose every weight comes from the counts
  (:mod:`.residual`: the residual subspaces and the capacity rule; :mod:`.detectors`: the MLP
  n-gram detectors; :mod:`.circuits`: the weights circuit by circuit);
* the "oracle inputs" ceiling, :mod:`.derivation`: the earlier derivation, whose queries are
  told their n-gram from outside through the ``qk_inputs`` hook (:mod:`.factors`: its
  ingredients and the per-table algebra, shared with :mod:`.gpt2`; :mod:`.calibration`: tau);
* ``"4"``, :mod:`.trained`: trained token embeddings, every attention weight frozen
  (:mod:`.training`: the optax loop).

:mod:`.ablation` adds Option 3's ingredients one at a time, beside the oracle-inputs ceiling,
and formats the table.

Every option runs on the same :class:`jaxattn.pipeline.Prepared` run through a function
``run(prep, *, progress=True, timer=None, **knobs) -> AnalysisResult`` and is measured with
:func:`jaxattn.pipeline.evaluate` on the same held-out sequences as the baseline; everything
an option derives, calibrates or trains comes from the count corpus only. A new option is one
module with such a function plus one :class:`OptionSpec` line in ``_SPECS`` (:data:`REGISTRY`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from jaxattn.errors import JaxattnError
from jaxattn.options.ablation import (
    ABLATION_METRICS,
    ABLATION_STEPS,
    GPT2_STEPS,
    GPT2_VARIANTS,
    ablation,
    format_ablation,
    greedy_order,
    leave_one_out,
    oracle_ablation,
    summarize,
)
from jaxattn.options.calibration import calibrate_temperature, calibration_set, fit_tau
from jaxattn.options.derivation import (
    Derivation,
    QKInputs,
    derive_calibrated,
    derive_oracle,
    run_derivation,
    stream_rows,
)
from jaxattn.options.direct import (
    DIRECT_FLOOR,
    DirectTables,
    direct_logits,
    direct_logits_fn,
    direct_row_ids,
    direct_tables,
    option2_costs,
    run_option2,
)
from jaxattn.options.factors import (
    INGREDIENTS,
    ORACLE_INPUTS,
    SEED_DERIVATION,
    DerivationConfig,
    NgramQueryTable,
    TableFactors,
    centred_target,
    lstsq,
    ngram_query_table,
    smoothed_log_probs,
    table_factors,
)
from jaxattn.options.gpt2 import GPT2_OPTION3, GPT2Config, check_fits, derive_gpt2, run_gpt2, run_option3
from jaxattn.options.ppmi import (
    PPMIConfig,
    cooccurrence_matrix,
    layer0_circuit_error,
    place_embeddings,
    ppmi_embeddings,
    ppmi_matrix,
    ppmi_vectors,
    run_option1,
)
from jaxattn.options.residual import CapacityError
from jaxattn.options.trained import (
    default_train_config,
    embedding_stats,
    forward_flops_per_token,
    heldout_alignment,
    run_option4,
    score_scale,
)
from jaxattn.options.training import TrainConfig, train_embeddings
from jaxattn.pipeline import AnalysisResult, Prepared, run_baseline
from jaxattn.progress import Timer

__all__ = [
    "ABLATION_METRICS",
    "ABLATION_STEPS",
    "CapacityError",
    "DIRECT_FLOOR",
    "GPT2_OPTION3",
    "INGREDIENTS",
    "LABELS",
    "ORACLE_INPUTS",
    "OPTIONS",
    "REGISTRY",
    "SEED_DERIVATION",
    "Derivation",
    "DerivationConfig",
    "DirectTables",
    "GPT2Config",
    "GPT2_STEPS",
    "GPT2_VARIANTS",
    "NgramQueryTable",
    "OptionSpec",
    "PPMIConfig",
    "QKInputs",
    "TableFactors",
    "TrainConfig",
    "ablation",
    "calibrate_temperature",
    "calibration_set",
    "check_fits",
    "centred_target",
    "cooccurrence_matrix",
    "default_train_config",
    "derive_calibrated",
    "derive_gpt2",
    "derive_oracle",
    "direct_logits",
    "direct_logits_fn",
    "direct_row_ids",
    "direct_tables",
    "embedding_stats",
    "fit_tau",
    "format_ablation",
    "forward_flops_per_token",
    "greedy_order",
    "heldout_alignment",
    "layer0_circuit_error",
    "leave_one_out",
    "oracle_ablation",
    "lstsq",
    "ngram_query_table",
    "option2_costs",
    "parse_options",
    "place_embeddings",
    "ppmi_embeddings",
    "ppmi_matrix",
    "ppmi_vectors",
    "run_derivation",
    "run_gpt2",
    "run_option",
    "run_option1",
    "run_option2",
    "run_option3",
    "run_option4",
    "score_scale",
    "smoothed_log_probs",
    "stream_rows",
    "summarize",
    "table_factors",
    "train_embeddings",
]

#: ``run(prep, *, progress=True, timer=None, **knobs) -> AnalysisResult``.
RunFn = Callable[..., AnalysisResult]


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One registered option.

    Attributes:
        name: the name on the command line and in :func:`run_option` ("baseline", "1", ...).
        label: the ``option`` field of its records and its result ("baseline", "option1", ...).
        description: one line, for the command line's help.
        run: ``run(prep, *, progress=True, timer=None, **knobs) -> AnalysisResult``.
        ceiling: an upper bound rather than a candidate solution (Option 2 reads the count
            tables directly instead of deriving weights).
        exportable: its model is a plain GPT-2 (no ``qk_inputs`` or ``attn_logits`` hook), so
            ``jaxattn export`` can write it as a HuggingFace checkpoint.
    """

    name: str
    label: str
    description: str
    run: RunFn
    ceiling: bool = False
    exportable: bool = True


#: Every option, in canonical order (the order of tables, plots and ``--options all``): one line each.
_SPECS = (
    OptionSpec("baseline", "baseline", "the seed derivation, unchanged", run_baseline),
    OptionSpec("1", "option1", "PPMI + SVD token embeddings under the seed derivation", run_option1),
    OptionSpec(
        "2", "option2", "attention logits gathered from the count tables", run_option2, ceiling=True, exportable=False
    ),
    OptionSpec("3", "option3", "a standard GPT-2 whose every weight comes from the counts", run_option3),
    OptionSpec("4", "option4", "trained token embeddings, every attention weight frozen", run_option4),
)

#: Option name -> :class:`OptionSpec`, in canonical order (read-only).
REGISTRY: Mapping[str, OptionSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})

#: The option names, in canonical order.
OPTIONS: tuple[str, ...] = tuple(REGISTRY)

#: Option name -> the label its records carry.
LABELS: Mapping[str, str] = MappingProxyType({name: spec.label for name, spec in REGISTRY.items()})


def run_option(
    prep: Prepared, option: str, *, progress: bool = True, timer: Timer | None = None, **kw: Any
) -> AnalysisResult:
    """Runs one registered option on a prepared run.

    Args:
        prep: the prepared run (count tables, held-out sequences, expected attention).
        option: a name of :data:`REGISTRY` ("baseline", "1", "2", "3" or "4").
        progress: progress bars.
        timer: stage timer (None: untimed).
        **kw: option-specific knobs: ``ppmi=PPMIConfig`` (1), ``floor``/``measure_cost`` (2),
            ``derivation=GPT2Config`` (3), anything :func:`run_option4` takes (4).

    Returns:
        :class:`~jaxattn.pipeline.AnalysisResult` labelled "baseline", "option1", ..., "option4".

    Raises:
        JaxattnError: unknown option.
    """
    spec = REGISTRY.get(str(option))
    if spec is None:
        raise JaxattnError(f"unknown option {str(option)!r}; choose one of {list(OPTIONS)}")
    return spec.run(prep, progress=progress, timer=timer, **kw)


def parse_options(spec: str | Sequence[str] | None) -> list[str]:
    """Option names from ``--options`` ("all", or a comma list such as "baseline,2,option4").

    Args:
        spec: the flag's value, a list of names, or None (every option).

    Returns:
        The selected options in canonical order ("baseline", "1", ..., "4").

    Raises:
        JaxattnError: an unknown name (the bad value and the valid ones are named) or an empty list.
    """
    if spec is None:
        return list(OPTIONS)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    chosen: set[str] = set()
    for raw in items:
        name = str(raw).strip().lower()
        if not name:
            continue
        if name == "all":
            chosen.update(OPTIONS)
            continue
        name = name.removeprefix("option")
        if name not in OPTIONS:
            raise JaxattnError(
                f"unknown option {str(raw).strip()!r} in --options; choose from all, {', '.join(OPTIONS)}"
            )
        chosen.add(name)
    if not chosen:
        raise JaxattnError(f"--options {spec!r} selects no option; choose from all, {', '.join(OPTIONS)}")
    return [o for o in OPTIONS if o in chosen]
