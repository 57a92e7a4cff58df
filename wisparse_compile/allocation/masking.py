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
        slot = self.weights.slot_of(call.weight)
        return masked_input(call.x, self.thresholds[slot], call.row_experts)  # type: ignore[index]
