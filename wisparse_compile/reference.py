"""Eager masked execution of an attached plan, and achieved-sparsity measurement.

``masked_linears()`` applies each planned weight's mask to its linear's input in eager mode,
through the same call forms the compiler rewrites. It is the reference the compiled model is
checked against and the way to evaluate a plan without compiling.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .attach import site_of, thresholds_of
from .calibrate import model_device, run_batch
from .mask import apply_keep, expert_keep_mask
from .linear_forms import LinearForm, WeightViews


class masked_linears(TorchFunctionMode):
    """Context manager: planned linears see their masked input; counts pruned channels per linear.

    apply=False only counts (each linear's sparsity on dense activations).
    max_rows: mask only calls with at most this many token rows, e.g. the batch size to mask decode
        steps only, as ``generate`` does when only its decode step is compiled (prefill runs eager).
    """

    def __init__(self, apply: bool = True, max_rows: int | None = None) -> None:
        super().__init__()
        self.apply = apply
        self.max_rows = max_rows
        self.pruned: dict[str, float] = {}
        self.seen: dict[str, float] = {}
        self.views = WeightViews(lambda t: site_of(t) is not None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        call = self.views.resolve(func, args, kwargs)
        if call is not None and self.max_rows is not None and call.x.numel() > self.max_rows * call.x.shape[-1]:
            call = None
        if call is not None:
            site, x = site_of(call.weight), call.x
            keep = expert_keep_mask(x, thresholds_of(call.weight), call.row_experts)
            self.pruned[site.name] = self.pruned.get(site.name, 0.0) + float((~keep).sum())
            self.seen[site.name] = self.seen.get(site.name, 0.0) + keep.numel()
            if self.apply:
                args, kwargs = _replace_operand(call.form, args, kwargs, apply_keep(x, keep))
        result = func(*args, **(kwargs or {}))
        self.views.record(func, args, kwargs, result)
        return result

    def sparsity(self) -> dict[str, float]:
        """Achieved sparsity per planned linear over the calls seen so far."""
        return {n: self.pruned[n] / self.seen[n] for n in self.seen if self.seen[n]}


def _replace_operand(form: LinearForm, args: tuple, kwargs: dict | None, x: torch.Tensor) -> tuple[tuple, dict]:
    """The call's (args, kwargs) with its activation operand replaced by ``x``."""
    kwargs = dict(kwargs or {})
    if form.x_arg < len(args):
        args = (*args[: form.x_arg], x, *args[form.x_arg + 1 :])
    else:
        kwargs[form.arg_names[0]] = x
    return args, kwargs


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
