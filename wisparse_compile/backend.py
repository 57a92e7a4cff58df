"""The ``wisparse`` torch.compile backend: rewrite planned linears, then lower through Inductor.

``torch.compile(model, backend="wisparse")`` finds this function through the
``torch_dynamo_backends`` entry point (no import needed once the package is installed).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import fx

from . import kernels  # noqa: F401  (registers torch.ops.wisparse.*)
from .attach import ThresholdFeed, any_attached, attach_generation, site_of
from .config import BackendConfig
from .debug import record_graph
from .kernels.cpu_kernel import cpu_compile_patches
from .passes.fuse_siblings import FusionResult, fuse_sibling_linears, with_fused_weights
from .passes.sparse_linear import RewriteResult, copy_dynamo_graph_module, rewrite_sparse_linears

log = logging.getLogger(__name__)

#: Reports of the graphs compiled in this process, newest last (for tests and debugging).
COMPILED_REPORTS: list[RewriteResult] = []


def _inductor_patches(mode: str | None, options: dict[str, Any]) -> dict[str, Any]:
    if mode is not None and options:
        raise ValueError("torch.compile: give either mode or options to the wisparse backend, not both")
    if mode is None or mode == "default":
        return dict(options)
    return dict(torch._inductor.list_mode_options(mode))


def _with_thresholds(compiled: Callable[..., Any], result: RewriteResult) -> Callable[..., Any]:
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

    return ThresholdFeed(result.threshold_sources, result.threshold_examples, warn_unplanned).bind(compiled)


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


def wisparse_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """Dynamo backend: sparsify the planned linears of ``gm``, compile with Inductor."""
    from torch._inductor.compile_fx import compile_fx

    config, inductor_options = BackendConfig.split_options(options)
    patches = _inductor_patches(mode, inductor_options)
    before = gm
    if any_attached() and any(site_of(e) is not None for e in example_inputs):
        if _records_autograd(example_inputs):
            return _compile_dense_for_autograd(gm, example_inputs, patches)
        gm = copy_dynamo_graph_module(gm)
    result = rewrite_sparse_linears(gm, example_inputs, config)
    fusion = fuse_sibling_linears(gm, example_inputs, result) if config.fuse_siblings else FusionResult()
    COMPILED_REPORTS.append(result)
    record_graph(before, gm, example_inputs, result, config.debug_dir)
    log.info("wisparse: %s", result.summary())
    if not result.rewritten:
        planned = [d for d in result.decisions if d.name is not None and not d.reason.startswith("prefill left dense")]
        if planned:
            warnings.warn(
                f"wisparse: none of the {len(planned)} planned linears of this graph can run sparse, "
                f"so it compiles dense: {result.summary()}",
                stacklevel=2,
            )
        compiled = compile_fx(gm, list(example_inputs), config_patches=patches)
        return _watch_for_late_plans(compiled, sorted(set(result.unplanned_weight_inputs)))
    patches.update(cpu_compile_patches(example_inputs))
    compiled = compile_fx(gm, [*example_inputs, *result.threshold_examples, *fusion.examples], config_patches=patches)
    return _with_thresholds(with_fused_weights(compiled, fusion), result)
