"""The ``wisparse`` torch.compile backend: rewrite planned linears, then lower through Inductor.

``torch.compile(model, backend="wisparse")`` finds ``wisparse_backend`` through the
``torch_dynamo_backends`` entry point (no import needed once the package is installed);
``torch.compile(model, backend=wsc.sparse_backend(...))`` gives the same backend typed options.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import fx

from . import kernels  # noqa: F401  (registers torch.ops.wisparse.*)
from .attach import ThresholdFeed, any_attached, attach_generation, site_of
from .config import BackendConfig
from .debug import record_graph
from .debug.history import CompileHistory
from .kernels import cpu_compile_patches
from .passes.decisions import CompileReport, DenseReason, RewriteResult
from .passes.fuse_siblings import FusionResult, fuse_sibling_linears, with_fused_weights
from .passes.graph_utils import copy_dynamo_graph_module
from .passes.group_quantized import group_quantized_siblings
from .passes.sparsify import rewrite_sparse_linears
from .sharding import process_rank

log = logging.getLogger(__name__)

#: Reports of the graphs compiled in this process (the last 64; ``len()`` counts all), newest last.
COMPILED_REPORTS = CompileHistory()


def last_compile_report() -> CompileReport:
    """The report of the graph the wisparse backend compiled last in this process."""
    if not len(COMPILED_REPORTS):
        raise LookupError("the wisparse backend has compiled nothing yet: run the torch.compile'd model first")
    return COMPILED_REPORTS[-1]


def _with_thresholds(
    compiled: Callable[..., Any], result: RewriteResult, example_inputs: Sequence[Any]
) -> Callable[..., Any]:
    """Append, per call, the thresholds of the weights actually passed.

    ``ThresholdFeed`` resolves them once per (weights, plan generation): a steady decode step adds
    one identity check, and the same threshold tensors every step; a plan swap (attach again)
    takes effect at the next call without recompiling.
    """
    warned = False

    def warn_unplanned() -> None:
        nonlocal warned
        if not warned:
            warned = True
            warnings.warn(
                "wisparse: a graph compiled for a model with a plan is running with weights "
                "that have none; those linears run dense (zero thresholds)",
                stacklevel=4,  # the caller of the bound run (as before the feed)
            )

    compiled_weights = [example_inputs[i] for i in result.threshold_sources]
    return ThresholdFeed(result.threshold_sources, result.threshold_examples, warn_unplanned, compiled_weights).bind(
        compiled
    )


def _watch_for_late_plans(compiled: Callable[..., Any], weight_indices: list[int]) -> Callable[..., Any]:
    """A dense graph that later meets planned weights (plan attached after compiling) says so."""
    if not weight_indices:
        return compiled
    seen_generation = -1

    def run(*args: Any) -> Any:
        nonlocal seen_generation
        generation = attach_generation()
        if seen_generation != generation:
            seen_generation = generation
            if any_attached() and any(site_of(args[i]) is not None for i in weight_indices):
                warnings.warn(
                    "wisparse: this graph was compiled before a plan was attached and runs dense; "
                    "attach the plan before torch.compile, or call torch._dynamo.reset() and compile again",
                    stacklevel=2,
                )
        return compiled(*args)

    return run


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


@dataclasses.dataclass(frozen=True)
class WisparseBackend:
    """The wisparse backend with its options: ``torch.compile(model, backend=WisparseBackend(config))``.

    ``wsc.sparse_backend(...)`` builds one from keywords. ``mode``/``options`` that torch.compile
    passes as well are applied over ``config`` (``BackendConfig.with_compile_args``).
    """

    config: BackendConfig = dataclasses.field(default_factory=BackendConfig)

    def __call__(
        self, gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> Callable[..., Any]:
        config = self.config.with_compile_args(mode, options) if (mode or options) else self.config
        return _compile(gm, example_inputs, config)


def sparse_backend(
    *,
    mode: str | None = None,
    fuse_siblings: bool = BackendConfig.fuse_siblings,
    group_quantized: bool = BackendConfig.group_quantized,
    max_sparse_rows: int = BackendConfig.max_sparse_rows,
    mask_prefill: bool = BackendConfig.mask_prefill,
    debug_dir: str | None = BackendConfig.debug_dir,
    inductor_options: dict[str, Any] | None = None,
) -> WisparseBackend:
    """The wisparse backend, typed: ``torch.compile(model, backend=wsc.sparse_backend(mode="reduce-overhead"))``.

    Unlike ``backend="wisparse", options=...`` it takes an Inductor ``mode`` together with the
    backend's options and Inductor's (``inductor_options``, applied over the mode's); the fields
    are ``BackendConfig``'s.
    """
    return WisparseBackend(BackendConfig(
        max_sparse_rows=max_sparse_rows, mask_prefill=mask_prefill, debug_dir=debug_dir,
        fuse_siblings=fuse_siblings, group_quantized=group_quantized, mode=mode, inductor_options=dict(inductor_options or {}),
    ))


def wisparse_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """Dynamo backend ``"wisparse"``: ``options`` holds the backend's keys and Inductor's."""
    return WisparseBackend()(gm, example_inputs, mode=mode, options=options)


def _compile(gm: fx.GraphModule, example_inputs: Sequence[Any], config: BackendConfig) -> Callable[..., Any]:
    """Sparsify the planned linears of ``gm`` (fuse siblings if asked, group quantized ones), compile with Inductor."""
    from torch._inductor.compile_fx import compile_fx

    patches = config.inductor_patches()
    before = gm
    if any_attached() and any(site_of(e) is not None for e in example_inputs):
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
    record_graph(before, gm, example_inputs, report, config.debug_dir)
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
        return _watch_for_late_plans(compiled, sorted(set(result.unplanned_weight_inputs)))
    patches.update(cpu_compile_patches(example_inputs))
    compiled = compile_fx(gm, [*example_inputs, *result.threshold_examples, *fusion.examples], config_patches=patches)
    return _with_thresholds(with_fused_weights(compiled, fusion), result, example_inputs)
