"""Stacked expert weights: keep mixture-of-experts layers traceable when a plan is attached.

Hugging Face's "eager" experts implementation loops over the experts that ``nonzero`` finds, which
breaks the Dynamo graph, so its expert matmuls never reach a backend. The generic
``set_experts_implementation`` API switches every experts layer of a model to a traceable
implementation ("grouped_mm") with the same results; no model code is involved.
"""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)

TRACEABLE_EXPERTS = "grouped_mm"


def has_stacked_experts(model: nn.Module) -> bool:
    """Whether the model keeps weights stacked over a leading (expert) dim: 3-D parameters."""
    return any(p.dim() >= 3 for p in model.parameters())


def make_experts_traceable(model: nn.Module) -> bool:
    """Switch "eager" experts to a traceable implementation; True if it switched (logged)."""
    config = getattr(model, "config", None)
    current = getattr(config, "_experts_implementation", None)
    if current != "eager" or not hasattr(model, "set_experts_implementation") or not has_stacked_experts(model):
        return False
    model.set_experts_implementation(TRACEABLE_EXPERTS)
    log.warning(
        "wisparse: %s used the 'eager' experts implementation, which graph-breaks under torch.compile; "
        "switched it to %r (same results) so the whole model compiles as one graph",
        type(model).__name__, TRACEABLE_EXPERTS,
    )
    return True
