"""Eager masking with *candidate* thresholds (not an attached plan), for allocation searches.

A search tries many sparsity splits; each becomes thresholds through the per-linear score
histograms (no new pass over data) and is evaluated by running the model under
``candidate_masks``, which masks every call of a listed weight through the same call forms the
compiler rewrites.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..mask import masked_input
from ..observer import LinearCall, LinearObserver


class candidate_masks(LinearObserver):
    """Context manager: linears whose weight is in ``thresholds`` (by ``id``) see masked inputs.

    The weight is followed through views (``x @ W.T``) and expert indexing (stacked experts: each
    row is masked by its expert's thresholds), as the compiler's pass does."""

    def __init__(self, thresholds: Mapping[int, torch.Tensor]) -> None:
        super().__init__(lambda t: id(t) in thresholds)
        self.thresholds = thresholds

    def on_linear(self, call: LinearCall) -> torch.Tensor:
        return masked_input(call.x, self.thresholds[id(call.weight)], call.row_experts)
