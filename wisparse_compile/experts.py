"""Stacked expert weights: keep mixture-of-experts layers traceable when a plan is attached.

Hugging Face's "eager" experts implementation loops over the experts that ``nonzero`` finds, which
breaks the Dynamo graph, so its expert matmuls never reach a backend. The generic
``set_experts_implementation`` API switches every experts layer of a model to a traceable
implementation ("grouped_mm") with the same results; no model code is involved.

Not every class takes that switch (transformers allows it only for model code written with its
``use_experts_implementation`` decorator; several MoE classes are not): such a model keeps its
own experts code, attach still works, and the log says so. Its expert linears are then sparse
where the compiled graphs see them in a linear form, and dense (named in the compile report, with
the reason) where they do not.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

TRACEABLE_EXPERTS = "grouped_mm"


def is_expert_stack(weight: torch.Tensor) -> bool:
    """Whether a parameter's shape is a stack of per-expert matrices, ``[E, out, in]`` or
    ``[E, in, out]``: at least two experts, each a matrix (both other dims above 1).

    That is the only shape the expert forms the compiler rewrites take (``grouped_mm``, ``bmm``
    on ``W[expert_ids]``, a linear on ``W[e]``: the graph indexes or groups dim 0 by expert).
    A leading dim of 1 is a broadcast, not an expert: a vision pooling head's ``probe`` and a
    ``cls_token`` [1, 1, D], ``position_embeddings`` [1, N, D]."""
    return weight.dim() == 3 and weight.shape[0] >= 2 and min(weight.shape[1:]) >= 2


def has_stacked_experts(model: nn.Module) -> bool:
    """Whether the model keeps weights stacked over experts (``is_expert_stack``), outside
    convolutions (a state-space layer's depthwise convolution weight [C, 1, K] is no expert)."""
    return any(
        is_expert_stack(p)
        for module in model.modules() if not isinstance(module, nn.modules.conv._ConvNd)
        for p in module.parameters(recurse=False)
    )


def experts_switch_refusal(model: nn.Module) -> str | None:
    """Why ``model`` cannot switch its experts implementation, or None if it can."""
    can_set = getattr(type(model), "_can_set_experts_implementation", None)
    if can_set is None:
        return None
    try:
        return None if can_set() else "its model code does not support setting the experts implementation"
    except Exception as e:  # a transformers-internal check failing is a refusal, not an attach error
        return f"transformers could not tell whether it supports setting the experts implementation ({e})"


def make_experts_traceable(model: nn.Module) -> bool:
    """Switch "eager" experts to a traceable implementation; True if it switched (logged).

    A model whose class refuses the switch keeps its experts code: False, with a warning that says
    why and what it means for the compiled model."""
    config = getattr(model, "config", None)
    current = getattr(config, "_experts_implementation", None)
    if current != "eager" or not hasattr(model, "set_experts_implementation") or not has_stacked_experts(model):
        return False
    reason = experts_switch_refusal(model)
    if reason is None:
        try:
            model.set_experts_implementation(TRACEABLE_EXPERTS)
        except (ValueError, NotImplementedError, RuntimeError) as e:
            reason = f"transformers refused the switch ({e})"
    if reason is not None:
        log.warning(
            "wisparse: %s keeps its own experts code, not %r: %s. Under torch.compile its experts may "
            "graph-break; expert linears the compiled graphs do not see in a linear form stay dense "
            "(the compile report names them)",
            type(model).__name__, TRACEABLE_EXPERTS, reason,
        )
        return False
    log.warning(
        "wisparse: %s used the 'eager' experts implementation, which graph-breaks under torch.compile; "
        "switched it to %r (same results) so the whole model compiles as one graph",
        type(model).__name__, TRACEABLE_EXPERTS,
    )
    return True
