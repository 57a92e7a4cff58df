"""Eager masking with *candidate* thresholds (not an attached plan), for allocation searches.

A search tries many sparsity splits; each becomes thresholds through the per-linear score
histograms (no new pass over data) and is evaluated by running the model under
``candidate_masks``, which masks every call of a listed weight through the same call forms the
compiler rewrites.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch.overrides import TorchFunctionMode

from ..kernels import keep_mask
from ..linear_forms import call_operands, form_of


class candidate_masks(TorchFunctionMode):
    """Context manager: linears whose weight is in ``thresholds`` (by ``id``) see masked inputs."""

    def __init__(self, thresholds: Mapping[int, torch.Tensor]) -> None:
        super().__init__()
        self.thresholds = thresholds

    def __torch_function__(self, func, types, args=(), kwargs=None):
        form = form_of(func)
        if form is not None:
            x, weight, _ = call_operands(form, args, kwargs)
            t = self.thresholds.get(id(weight))
            if t is not None and isinstance(x, torch.Tensor):
                args = list(args)
                args[form.x_arg] = torch.where(keep_mask(x, t), x, torch.zeros((), dtype=x.dtype, device=x.device))
        return func(*args, **(kwargs or {}))
