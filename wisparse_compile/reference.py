"""Eager masked execution of an attached plan, and achieved-sparsity measurement.

``masked_linears()`` applies each planned weight's mask to its linear's input in eager mode,
through the same call forms the compiler rewrites. It is the reference the compiled model is
checked against and the way to evaluate a plan without compiling.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from .planned import plan_of, thresholds_of
from .mask import apply_keep, expert_keep_mask
from .model_io import model_device, run_batch
from .observer import LinearCall, LinearObserver


class masked_linears(LinearObserver):
    """Context manager: planned linears see their masked input; counts pruned channels per linear.

    apply=False only counts (each linear's sparsity on dense activations).
    max_rows: mask only calls with at most this many token rows, e.g. the batch size to mask decode
        steps only, as ``generate`` does when only its decode step is compiled (prefill runs eager).
    """

    def __init__(self, apply: bool = True, max_rows: int | None = None) -> None:
        super().__init__(lambda t: plan_of(t) is not None)
        self.apply = apply
        self.max_rows = max_rows
        self.pruned: dict[str, float] = {}
        self.seen: dict[str, float] = {}

    def on_linear(self, call: LinearCall) -> torch.Tensor | None:
        x = call.x
        if self.max_rows is not None and x.numel() > self.max_rows * x.shape[-1]:
            return None
        name = plan_of(call.weight).name
        keep = expert_keep_mask(x, thresholds_of(call.weight), call.row_experts)
        self.pruned[name] = self.pruned.get(name, 0.0) + float((~keep).sum())
        self.seen[name] = self.seen.get(name, 0.0) + keep.numel()
        return apply_keep(x, keep) if self.apply else None

    def sparsity(self) -> dict[str, float]:
        """Achieved sparsity per planned linear over the calls seen so far."""
        return {n: self.pruned[n] / self.seen[n] for n in self.seen if self.seen[n]}


def measure_sparsity(model: nn.Module, batches: Iterable[Any], masked: bool = True) -> dict[str, float]:
    """Achieved per-linear sparsity of the attached plan on ``batches``.

    masked=True masks every planned linear (what the compiled model does, upstream sparsity
    included); masked=False measures each linear on dense activations.
    """
    device = model_device(model)
    with torch.no_grad(), masked_linears(apply=masked) as mode:
        for batch in batches:
            run_batch(model, batch, device)
    return mode.sparsity()
