"""The ``wisparse`` torch.compile backend: rewrite planned linears, then lower through Inductor.

``torch.compile(model, backend="wisparse")`` finds ``wisparse_backend`` through the
``torch_dynamo_backends`` entry point (no import needed once the package is installed);
``torch.compile(model, backend=wsc.WisparseBackend(...))`` gives the same backend typed options.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import fx

from . import kernels  # noqa: F401  (registers torch.ops.wisparse.*)
from .config import BackendConfig
from .debug import record_graph
from .debug.history import CompileHistory
from .kernels import cpu_compile_patches
from .passes.decisions import CompileReport, DenseReason
from .passes.fuse_siblings import FusionResult, fuse_sibling_linears, with_fused_weights
from .passes.graph_utils import copy_dynamo_graph_module
from .passes.group_quantized import group_quantized_siblings
from .passes.sparsify import rewrite_sparse_linears
from .planned import plan_of
from .runtime import watch_for_late_plans, with_thresholds
from .sharding import process_rank

log = logging.getLogger(__name__)

#: Reports of the graphs compiled in this process (the last 64; ``len()`` counts all), newest last.
COMPILED_REPORTS = CompileHistory()


def last_compile_report() -> CompileReport:
    """The report of the graph the wisparse backend compiled last in this process."""
    if not len(COMPILED_REPORTS):
        raise LookupError("the wisparse backend has compiled nothing yet: run the torch.compile'd model first")
    return COMPILED_REPORTS[-1]


def _records_autograd(example_inputs: Sequence[Any]) -> bool:
    """Whether this graph is compiled for autograd: grad mode on and an input that requires grad.

    Dynamo guards on grad mode, so the same code under ``torch.no_grad()`` compiles separately.
    """
    return torch.is_grad_enabled() and any(isinstance(e, torch.Tensor) and e.requires_grad for e in example_inputs)


def _compile_dense_for_autograd(
    gm: fx.GraphModule, example_inputs: Sequence[Any], patches: dict[str, Any]
) -> Callable[..., Any]:
    """A graph that records autograd compiles dense (the sparse ops have no backward), and says so."""
    from torch._inductor.compile_fx import compile_fx

    warnings.warn(
        "wisparse: this graph runs with autograd recording (grad enabled and parameters that require "
        "grad), and the sparse ops have no backward, so its planned linears run DENSE (outputs and "
        "gradients are the dense model's); for the sparse model run inference under torch.no_grad() "
        "or torch.inference_mode(), or call model.requires_grad_(False)",
        stacklevel=2,
    )
    return compile_fx(gm, list(example_inputs), config_patches=patches)


class WisparseBackend:
    """The wisparse torch.compile backend: ``torch.compile(model, backend=wsc.WisparseBackend(mode="reduce-overhead"))``.

    Takes a ``BackendConfig`` or its fields as keywords (``WisparseBackend(fuse_siblings=True)``).
    Unlike ``backend="wisparse", options=...`` it takes an Inductor ``mode`` together with the
    backend's options and Inductor's (``inductor_options``, applied over the mode's); ``mode``/
    ``options`` that torch.compile passes as well are applied over the config
    (``BackendConfig.with_compile_args``). Each object is a backend of its own: Dynamo tells two
    models compiled with module guards skipped apart by their backend objects.
    """

    def __init__(self, config: BackendConfig | None = None, **options: Any) -> None:
        if config is not None and options:
            raise TypeError("WisparseBackend takes a BackendConfig or its fields as keywords, not both")
        self.config = config if config is not None else BackendConfig(**options)

    def __repr__(self) -> str:
        return f"WisparseBackend({self.config!r})"

    def __call__(
        self, gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> Callable[..., Any]:
        config = self.config.with_compile_args(mode, options) if (mode or options) else self.config
        return _compile(gm, example_inputs, config)


#: Dynamo backend ``"wisparse"`` (the ``torch_dynamo_backends`` entry point): ``options`` holds the
#: backend's keys and Inductor's.
wisparse_backend = WisparseBackend()


def _compile(gm: fx.GraphModule, example_inputs: Sequence[Any], config: BackendConfig) -> Callable[..., Any]:
    """Sparsify the planned linears of ``gm`` (fuse siblings if asked, group quantized ones), compile with Inductor."""
    from torch._inductor.compile_fx import compile_fx

    patches = config.inductor_patches()
    before = gm
    if any(plan_of(e) is not None for e in example_inputs):
        if _records_autograd(example_inputs):
            return _compile_dense_for_autograd(gm, example_inputs, patches)
        gm = copy_dynamo_graph_module(gm)
    result = rewrite_sparse_linears(gm, example_inputs, config)
    fusion = fuse_sibling_linears(gm, example_inputs, result) if config.fuse_siblings else FusionResult()
    if config.group_quantized:
        group_quantized_siblings(gm, result)
    report = result.report
    report.rank = process_rank()  # each rank of a tensor-parallel run compiles (and reports) its own shard
    COMPILED_REPORTS.append(report)
    record_graph(before, gm, report, config.debug_dir)
    log.info("wisparse: %s", report.summary())
    if not report.rewritten:
        planned = [d for d in report.decisions if d.name is not None and d.reason_kind is not DenseReason.PREFILL]
        if planned:
            warnings.warn(
                f"wisparse: none of the {len(planned)} planned linears of this graph can run sparse, "
                f"so it compiles dense: {report.summary()}",
                stacklevel=2,
            )
        compiled = compile_fx(gm, list(example_inputs), config_patches=patches)
        return watch_for_late_plans(compiled, sorted(set(result.unplanned_weight_inputs)))
    patches.update(cpu_compile_patches(example_inputs))
    compiled = compile_fx(gm, [*example_inputs, *result.threshold_examples, *fusion.examples], config_patches=patches)
    return with_thresholds(with_fused_weights(compiled, fusion), result, example_inputs)
