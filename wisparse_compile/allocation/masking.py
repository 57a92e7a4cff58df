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

from ..mask import masked_input
from ..linear_forms import WeightViews


class candidate_masks(TorchFunctionMode):
    """Context manager: linears whose weight is in ``thresholds`` (by ``id``) see masked inputs.

    The weight is followed through views (``x @ W.T``) and expert indexing (stacked experts: each
    row is masked by its expert's thresholds), as the compiler's pass does."""

    def __init__(self, thresholds: Mapping[int, torch.Tensor]) -> None:
        super().__init__()
        self.thresholds = thresholds
        self.views = WeightViews(lambda t: id(t) in thresholds)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        call = self.views.resolve(func, args, kwargs)
        if call is not None and call.form.x_arg < len(args):
            args = list(args)
            args[call.form.x_arg] = masked_input(call.x, self.thresholds[id(call.weight)], call.row_experts)
        result = func(*args, **(kwargs or {}))
        self.views.record(func, args, kwargs, result)
        return result
