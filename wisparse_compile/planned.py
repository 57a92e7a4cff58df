"""What a planned weight carries: its plan slot (plan entry, fp32 thresholds), read through accessors.

``attach`` puts a ``WeightPlan`` on each planned weight (the attribute ``PLAN_ATTRIBUTE``); the
compiler passes, the backend's runtime, the eager reference and the reports read it off the weight
they are given (``plan_of``, ``thresholds_of``, ...), never from a table. Compiled graphs take
parameters as inputs and Dynamo does not guard on their identity, so one graph may run for several
model instances (or, after a graph break, several layers): the thresholds travel with the weight
tensor actually passed. Setting or changing the attribute compiles nothing (Dynamo guards neither
a tensor's attributes nor their contents); the runtime notices a change through ``plan_generation``.

The thresholds are not module buffers: ``model.to(torch.bfloat16)`` / ``.half()`` would cast them
(masks would shift; in fp16 large thresholds become inf). They stay fp32, and follow their weight to
another device once, on first use there (``thresholds_of``), never per call.

A copied or pickled weight carries no plan (``copy.deepcopy(model)`` gives an unplanned model:
attach the plan to the copy); a weight's plan survives ``.to()``, ``.data`` swaps and re-laying.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

#: The attribute of a planned weight that holds its ``WeightPlan``.
PLAN_ATTRIBUTE = "_wisparse_plan"

_generation = 0


class WeightPlan:
    """A planned weight's slot: its plan entry, its fp32 thresholds (one copy per device used), whether
    attach re-laid it, and the model the plan was attached to. ``problem`` instead of thresholds: a
    tensor-parallel shard that takes no slice of its plan's thresholds (it runs dense, this says why)."""

    __slots__ = ("name", "in_dim", "sparsity", "relaid", "model", "problem", "_thresholds", "__weakref__")

    def __init__(
        self, name: str, in_dim: int, sparsity: float, thresholds: torch.Tensor | None, relaid: bool, model: nn.Module,
        problem: str | None = None,
    ) -> None:
        self.name = name
        self.in_dim = in_dim
        self.sparsity = sparsity
        self.relaid = relaid  # attach re-laid the weight input-major; detach lays it back
        self.model = weakref.ref(model)
        self.problem = problem
        self._thresholds = {} if thresholds is None else {thresholds.device: thresholds}

    def thresholds_on(self, device: torch.device) -> torch.Tensor:
        """The fp32 thresholds on ``device``: copied there once, then the same tensor every call."""
        t = self._thresholds.get(device)
        if t is None:
            t = self._thresholds[device] = next(iter(self._thresholds.values())).to(device)
        return t

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a copied weight is unplanned: its model has no plan until attached

    def __reduce__(self) -> tuple:
        return (type(None), ())  # a pickled weight carries no plan (the slot refers to a live model)


def plan_generation() -> int:
    """Counter bumped whenever any weight's plan changes (``set_plan``, ``clear_plan``)."""
    return _generation


def _bump() -> None:
    global _generation
    _generation += 1


def _slot(weight: object) -> WeightPlan | None:
    """The slot on ``weight``, or on the tensor it is a same-layout view of: what a tensor-parallel
    parameter's ``to_local()`` returns in eager mode (a fresh view of its local shard per call)."""
    if not isinstance(weight, torch.Tensor):
        return None
    slot = getattr(weight, PLAN_ATTRIBUTE, None)
    if slot is None:
        base = weight._base
        if base is not None and base.shape == weight.shape and base.stride() == weight.stride():
            slot = getattr(base, PLAN_ATTRIBUTE, None)
    return slot


def plan_of(weight: object) -> WeightPlan | None:
    """The plan slot of a planned weight (one that runs sparse), or None (also for non-tensors)."""
    slot = _slot(weight)
    return slot if slot is not None and slot.problem is None else None


def thresholds_of(weight: object) -> torch.Tensor | None:
    """The fp32 thresholds of a planned weight, on its device; None if it has no plan."""
    slot = plan_of(weight)
    return None if slot is None else slot.thresholds_on(weight.device)  # type: ignore[union-attr]


def planned_sparsity(weight: object) -> float | None:
    """The target sparsity the attached plan gives ``weight``; None if it has no plan."""
    slot = plan_of(weight)
    return None if slot is None else slot.sparsity


def sharding_problem(weight: object) -> str | None:
    """Why a planned tensor-parallel weight runs dense (its shard takes no slice of the thresholds), or None."""
    slot = _slot(weight)
    return None if slot is None else slot.problem


def set_plan(weights: list[torch.Tensor], slot: WeightPlan) -> None:
    """Put ``slot`` on each of ``weights`` (a weight and, for a tensor-parallel one, its local shard)."""
    for weight in weights:
        setattr(weight, PLAN_ATTRIBUTE, slot)
    _bump()


def clear_plan(weights: list[torch.Tensor]) -> WeightPlan | None:
    """Take the slot off each of ``weights``; returns the first one's (None if it had none)."""
    slot = _slot(weights[0]) if weights else None
    for weight in weights:
        if getattr(weight, PLAN_ATTRIBUTE, None) is not None:
            delattr(weight, PLAN_ATTRIBUTE)
    _bump()
    return slot
