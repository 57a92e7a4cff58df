"""attach / detach: a model carries its plan, and each planned weight knows its thresholds.

Compiled graphs take parameters as inputs and Dynamo does not guard on their identity, so one
graph may run for several model instances (or, after a graph break, several layers). Thresholds
therefore travel with the *weight tensor actually passed*: a process-wide registry maps each
planned Parameter to the module buffer that holds its thresholds. Buffers follow ``model.to()``.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .experts import make_experts_traceable
from .kernels.cpu_kernel import input_major_gemm_is_slow
from .model_structure import find_weight, owner_and_attr
from .plan import PlanError, SparsityPlan

log = logging.getLogger(__name__)

_BUFFER_SUFFIX = "_wisparse_threshold"


@dataclass(frozen=True)
class _Site:
    """Where a planned weight's thresholds live: a non-persistent buffer of its owner module."""

    name: str
    in_dim: int
    owner: "weakref.ReferenceType[nn.Module]"
    buffer: str

    def thresholds(self) -> torch.Tensor | None:
        owner = self.owner()
        return None if owner is None else owner._buffers.get(self.buffer)


_SITES: WeakIdKeyDictionary = WeakIdKeyDictionary()
_PLANS: "weakref.WeakKeyDictionary[nn.Module, SparsityPlan]" = weakref.WeakKeyDictionary()
_generation = 0


def attach_generation() -> int:
    """Counter bumped by every attach/detach, so compiled code can re-check plans cheaply."""
    return _generation


def any_attached() -> bool:
    """Cheap check used on hot paths: is any plan attached anywhere in this process?"""
    return len(_SITES) > 0


def site_of(weight: object) -> _Site | None:
    try:
        return _SITES.get(weight)
    except TypeError:
        return None


def thresholds_of(weight: torch.Tensor) -> torch.Tensor | None:
    """The thresholds of a planned weight (on its device), or None if it has no plan."""
    site = site_of(weight)
    if site is None:
        return None
    t = site.thresholds()
    if t is not None and t.device != weight.device:
        t = t.to(weight.device)
    return t


def attached_plan(model: nn.Module) -> SparsityPlan | None:
    return _PLANS.get(model)


def validate_plan(model: nn.Module, plan: SparsityPlan) -> None:
    """Raise PlanError naming the first plan entry that does not fit ``model``."""
    model_class = type(model).__name__
    if plan.model_class != model_class:
        raise PlanError(
            f"plan was calibrated for {plan.model_class}, this model is {model_class}; "
            "calibrate a plan for this model with wsc.calibrate(model, batches, config)"
        )
    for name in plan.names:
        found = find_weight(model, name)
        if found is None:
            raise PlanError(f"plan entry {name!r} has no weight in this {model_class}: the plan is for another model")
        _, weight = found
        if list(weight.shape) != list(plan.shapes[name]):
            raise PlanError(
                f"plan entry {name!r} expects a weight of shape {list(plan.shapes[name])}, "
                f"this model's is {list(weight.shape)}: the plan is for another model size"
            )
        t = plan.channel_thresholds[name]
        expected = [weight.shape[0], t.shape[-1]] if weight.dim() == 3 else [t.shape[-1]]
        if list(t.shape) != expected:
            raise PlanError(
                f"plan entry {name!r} has thresholds of shape {list(t.shape)}, its {weight.dim()}-D weight needs "
                f"{expected} (stacked [E, ...] expert weights take one row per expert); re-calibrate the plan"
            )


_warned_slow_eager_layout = False


def _warn_slow_eager_layout(weight: torch.Tensor) -> None:
    global _warned_slow_eager_layout
    if _warned_slow_eager_layout or not input_major_gemm_is_slow(weight):
        return
    _warned_slow_eager_layout = True
    log.warning(
        "wisparse: attach re-laid %s CPU weights input-major for the sparse kernel; this CPU has no native "
        "%s GEMM, so EAGER matmuls on them (an uncompiled prefill, calibration, evaluation) run 20-40x "
        "slower than before attach (the wisparse-compiled model avoids it): run eager work before attach or "
        "through torch.compile(backend='wisparse'), or attach(..., input_major=False) for eager-only use.",
        str(weight.dtype).removeprefix("torch."), str(weight.dtype).removeprefix("torch."),
    )


def attach(model: nn.Module, plan: SparsityPlan, *, input_major: bool = True) -> nn.Module:
    """Give ``model`` its plan; ``torch.compile(model, backend="wisparse")`` then sparsifies it.

    input_major: re-lay each planned [out, in] weight in memory as its transpose (same values and
        shape, strides (1, out)), so the sparse kernel skips a pruned channel by skipping one
        contiguous row. Done once here, never per call. fp32 matmuls read it as a transposed
        operand at no cost, but bf16/fp16 ones on a CPU without native bf16/fp16 GEMM (AVX2) fall
        to a scalar loop for this layout, 20-40x slower (``input_major_gemm_is_slow``; one warning
        says so). The compiled sparse op avoids that (it widens its dense route to fp32); *eager*
        forward passes of the model do not, nor do linears the compiler leaves dense (e.g. prefill
        with ``mask_prefill=False``): run eager work (an uncompiled prefill, calibration,
        evaluation) before attaching or through the compiled model, or pass input_major=False for
        eager-only use (the CPU kernel is then not taken).
    Returns the model. Attaching again replaces the previous plan.
    """
    global _generation
    validate_plan(model, plan)
    _generation += 1
    if attached_plan(model) is not None:
        detach(model)
    for name in plan.names:
        param_name, weight = find_weight(model, name)  # type: ignore[misc]
        owner, attr = owner_and_attr(model, param_name)
        buffer = attr + _BUFFER_SUFFIX
        thresholds = plan.channel_thresholds[name].detach().to(weight.device, torch.float32)
        owner.register_buffer(buffer, thresholds, persistent=False)
        in_dim = plan.in_dims[name] % weight.dim()
        if input_major and weight.dim() == 2 and in_dim == 1 and weight.stride(0) != 1:
            with torch.no_grad():
                weight.data = weight.data.t().contiguous().t()
            _warn_slow_eager_layout(weight)
        _SITES[weight] = _Site(name, in_dim, weakref.ref(owner), buffer)
    _PLANS[model] = plan
    make_experts_traceable(model)
    log.info("attached %r to %s (%d linears)", plan, type(model).__name__, len(plan.names))
    return model


def detach(model: nn.Module) -> nn.Module:
    """Remove the plan: thresholds buffers are dropped and the model compiles densely again."""
    global _generation
    plan = _PLANS.pop(model, None)
    if plan is None:
        return model
    _generation += 1
    for name in plan.names:
        found = find_weight(model, name)
        if found is None:
            continue
        param_name, weight = found
        site = _SITES.pop(weight, None)
        if site is not None and (owner := site.owner()) is not None:
            owner._buffers.pop(site.buffer, None)
    return model
