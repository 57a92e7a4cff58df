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
from ..weight_slots import WatchedWeights, WeightSlot


class candidate_masks(LinearObserver):
    """Context manager: linears whose weight's slot is in ``thresholds`` see masked inputs.

    Keyed by ``WeightSlot`` (``weight_slots(model, names)``), so a weight that an offloading hook
    loads anew for each forward is masked too. The weight is followed through views (``x @ W.T``)
    and expert indexing (stacked experts: each row is masked by its expert's thresholds), as the
    compiler's pass does."""

    def __init__(self, thresholds: Mapping[WeightSlot, torch.Tensor]) -> None:
        self.weights = WatchedWeights(thresholds)
        super().__init__(self.weights)
        self.thresholds = thresholds

    def on_linear(self, call: LinearCall) -> torch.Tensor:
        thresholds = self.thresholds[self.weights.slot_of(call.weight)]  # type: ignore[index]
        # a model dispatched over several devices runs each layer where it sits: no copy otherwise
        return masked_input(call.x, thresholds.to(call.x.device), call.row_experts)
