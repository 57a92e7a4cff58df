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
from .kernels import keep_mask
from .linear_forms import call_operands, form_of


class masked_linears(TorchFunctionMode):
    """Context manager: planned linears see their masked input; counts pruned channels per linear.

    apply=False only counts (each linear's sparsity on dense activations).
    """

    def __init__(self, apply: bool = True) -> None:
        super().__init__()
        self.apply = apply
        self.pruned: dict[str, float] = {}
        self.seen: dict[str, float] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        form = form_of(func)
        if form is not None:
            x, weight, _ = call_operands(form, args, kwargs)
            site = site_of(weight)
            if site is not None and isinstance(x, torch.Tensor):
                t = thresholds_of(weight)
                keep = keep_mask(x, t)
                self.pruned[site.name] = self.pruned.get(site.name, 0.0) + float((~keep).sum())
                self.seen[site.name] = self.seen.get(site.name, 0.0) + keep.numel()
                if self.apply:
                    args = list(args)
                    args[form.x_arg] = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
        return func(*args, **(kwargs or {}))

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
