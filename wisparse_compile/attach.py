"""attach / detach: a model carries its plan, and each planned weight carries its plan slot.

``attach`` validates the plan against the model, quantizes the planned weights if asked
(``weights="int8"|"int4"``), re-lays planned float weights input-major, and puts a ``WeightPlan``
(plan entry, fp32 thresholds) on each planned weight (``planned.py``: what the compiler, the
runtime and the eager reference read off the weight they are given). ``detach`` undoes all of it.
"""

from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from .config import QuantizeConfig
from .experts import make_experts_traceable
from .kernels import input_major_gemm_is_slow
from .kernels.layout import input_major as input_major_copy, padded_row_length
from .model_structure import find_weight
from .plan import PlanError, SparsityPlan
from .planned import WeightPlan, clear_plan, plan_of, set_plan
from .quant.model import dequantize_model, quantization_of, quantize_model
from .sharding import ShardingError, describe, is_dtensor, local_tensor, local_thresholds, tensor_parallel_size
from .weight_slots import require_resident

log = logging.getLogger(__name__)

_PLANS: "weakref.WeakKeyDictionary[nn.Module, SparsityPlan]" = weakref.WeakKeyDictionary()


def _carriers(weight: torch.Tensor) -> list[torch.Tensor]:
    """The tensors that carry a weight's plan: the weight and, for a tensor-parallel one, its local shard
    (what the compiled graph and the eager reference compute with)."""
    return [weight, local_tensor(weight)] if is_dtensor(weight) else [weight]


def attached_plan(model: nn.Module) -> SparsityPlan | None:
    """The plan attached to ``model``, or None."""
    return _PLANS.get(model)


@contextmanager
def unplanned(weights: Iterable[torch.Tensor]) -> Iterator[None]:
    """While active, ``weights`` have no plan: compiled graphs and ``masked_linears`` run them dense.

    For references that mask some linears and not others; the plan comes back on exit.
    """
    saved = [(w, slot) for w in weights if (slot := plan_of(w)) is not None]
    for w, _ in saved:
        clear_plan(_carriers(w))
    try:
        yield
    finally:
        for w, slot in saved:
            set_plan(_carriers(w), slot)


def validate_plan(model: nn.Module, plan: SparsityPlan) -> None:
    """Raise PlanError naming the first plan entry that does not fit ``model``."""
    model_class = type(model).__name__
    if plan.model_class != model_class:
        raise PlanError(
            f"plan was calibrated for {plan.model_class}, this model is {model_class}; "
            "calibrate a plan for this model with wsc.calibrate(model, batches, config)"
        )
    require_resident(model, plan.names)  # weights accelerate loads per forward are new tensors each time
    for name in plan.names:
        found = find_weight(model, name)
        if found is None:
            raise PlanError(f"plan entry {name!r} has no weight in this {model_class}: the plan is for another model")
        _, weight = found
        if list(weight.shape) != list(plan.shapes[name]) and tensor_parallel_size(model) > 1 and not is_dtensor(weight):
            raise PlanError(
                f"plan entry {name!r} expects a weight of shape {list(plan.shapes[name])}, this tensor-parallel "
                f"model holds a plain local shard {list(weight.shape)} with no DTensor placements to say which "
                "slice it is; load it with transformers' tp_plan (DTensor parameters) so attach can slice the plan"
            )
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


def _is_input_major(weight: torch.Tensor) -> bool:
    weight = local_tensor(weight)
    return weight.dim() == 2 and weight.stride(0) == 1 and weight.stride(1) in (weight.shape[0], padded_row_length(weight))



def _relay(model: nn.Module, weight: torch.Tensor, input_major: bool) -> torch.Tensor:
    """Lay ``weight`` out input-major (or back to row-major): same values; returns the weight object.

    A plain parameter is changed in place (same object). A tensor-parallel (DTensor) parameter is
    re-laid in its local shard, which the compiled graph computes with (``to_local()``): as a new
    parameter put where the old one was, since swapping a DTensor's local tensor (``.data`` or
    ``_local_tensor``) breaks Dynamo's fake copy of it.
    """
    with torch.no_grad():
        if not is_dtensor(weight):
            weight.data = input_major_copy(weight.data) if input_major else weight.data.contiguous()
            return weight
        from torch.distributed.tensor import DTensor

        local = local_tensor(weight)
        local = input_major_copy(local) if input_major else local.contiguous()
        relaid = nn.Parameter(
            DTensor.from_local(local, weight.device_mesh, weight.placements, run_check=False,
                               shape=weight.shape, stride=weight.stride()),
            requires_grad=weight.requires_grad,
        )
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is weight:
                module._parameters[key] = relaid
    return relaid


def _weight_plan(name: str, weight: torch.Tensor, plan: SparsityPlan, in_dim: int, relaid: bool, model: nn.Module) -> WeightPlan:
    """The slot of ``weight``: the plan's fp32 thresholds, or its shard's slice of them (a tensor-parallel
    DTensor weight, ``sharding.local_thresholds``). A shard that takes no slice gets a slot with the
    reason instead (kept for the compile report, one warning): that linear runs dense."""
    thresholds = plan.channel_thresholds[name].detach().to(weight.device, torch.float32)
    sparsity = float(plan.sparsities[name])
    try:
        thresholds = local_thresholds(name, weight, thresholds, in_dim)
    except ShardingError as e:
        log.warning("wisparse: %s; this linear runs dense", e)
        return WeightPlan(name, in_dim, sparsity, None, relaid, model, problem=str(e))
    if is_dtensor(weight):
        log.debug("%s: %s, thresholds %s", name, describe(weight), list(thresholds.shape))
    return WeightPlan(name, in_dim, sparsity, thresholds, relaid, model)


def attach(
    model: nn.Module, plan: SparsityPlan, *, input_major: bool = True, weights: str | QuantizeConfig | None = None
) -> nn.Module:
    """Give ``model`` its plan; ``torch.compile(model, backend="wisparse")`` then sparsifies it.

    input_major: re-lay each planned [out, in] weight in memory as its transpose (same values and
        shape, strides (1, out)), so the sparse kernel skips a pruned channel by skipping one
        contiguous row. Done once here, never per call; ``detach`` lays it back. fp32 matmuls
        read it as a transposed operand at no cost, but bf16/fp16 ones on a CPU without native
        bf16/fp16 GEMM (AVX2) fall to a scalar loop for this layout, 20-40x slower
        (``input_major_gemm_is_slow``; one warning says so). The compiled sparse op avoids that
        (it widens its dense route to fp32); *eager* forward passes of the model do not, nor do
        linears the compiler leaves dense (e.g. prefill with ``mask_prefill=False``): run eager
        work (an uncompiled prefill, calibration, evaluation) before attaching or through the
        compiled model, or pass input_major=False for eager-only use (the CPU kernel is then not taken).
    The weights keep their values, so ``state_dict()`` / ``save_pretrained`` save the same model.
    Thresholds stay fp32 through ``model.to(dtype)``. Returns the model. Attaching again replaces
    the previous plan (weights it keeps input-major are not copied again).
    weights: ``"int8"`` or ``"int4"`` (or a ``QuantizeConfig``) also quantizes the planned
        weights and the output head to that format (``quant.model.quantize_model``: what it quantized is
        logged and returned by ``quantization_of(model)``); ``detach`` restores the float
        weights. A model quantized by an earlier attach to another format gets its float weights back
        first. ``None`` leaves the weights' storage as it is (a model quantized by an earlier attach stays quantized).

    A tensor-parallel model (``from_pretrained(..., tp_plan="auto")``, DTensor weights) takes the
    plan of the unsharded model: each rank keeps the thresholds of its shards' input channels
    (``sharding.local_thresholds``); a shard that takes no slice of them runs dense, with a warning
    and the reason in the compile report.
    """
    quantize = weights if isinstance(weights, QuantizeConfig) or weights is None else QuantizeConfig(weights)
    validate_plan(model, plan)
    if quantize is not None:  # the previous plan off the float weights, then swap in quantized ones (slots go on those)
        _unregister(model, keep_layout_of=set())
        previous = quantization_of(model)
        if previous is not None and previous.format != quantize.weights:
            dequantize_model(model)  # another format: back to float, never codes re-quantized
        quantize_model(model, plan.names, quantize, in_dims=plan.in_dims)
    planned_weights = [find_weight(model, name)[1] for name in plan.names]  # type: ignore[index]
    still_planned = {id(w) for w in planned_weights if w.dim() == 2} if input_major else set()
    kept_input_major = _unregister(model, keep_layout_of=still_planned)
    for name in plan.names:
        # looked up after _unregister: laying a weight back may have put a new (tensor-parallel) parameter in its place
        weight = find_weight(model, name)[1]  # type: ignore[index]
        in_dim = plan.in_dims[name] % weight.dim()
        slot = _weight_plan(name, weight, plan, in_dim, id(weight) in kept_input_major, model)
        if slot.problem is None and input_major and weight.dim() == 2 and in_dim == 1 and local_tensor(weight).stride(0) != 1:
            weight = _relay(model, weight, input_major=True)
            slot.relaid = True
            _warn_slow_eager_layout(local_tensor(weight))
        set_plan(_carriers(weight), slot)
    _PLANS[model] = plan
    make_experts_traceable(model)
    log.info("attached %r to %s (%d linears)", plan, type(model).__name__, len(plan.names))
    return model


def detach(model: nn.Module) -> nn.Module:
    """Remove the plan: weights attach re-laid go back to row-major, quantized weights back to float,
    and the model compiles densely."""
    _unregister(model, keep_layout_of=set())
    dequantize_model(model)
    return model


def _unregister(model: nn.Module, keep_layout_of: set[int]) -> set[int]:
    """Take the plan slots off ``model``'s weights; lay re-laid weights back unless their id is in ``keep_layout_of``.

    Returns the ids of weights left input-major by a previous attach (still to be laid back later).
    """
    plan = _PLANS.pop(model, None)
    if plan is None:
        return set()
    kept: set[int] = set()
    for name in plan.names:
        found = find_weight(model, name)
        if found is None:
            continue
        weight = found[1]
        slot = clear_plan(_carriers(weight))
        if slot is None or not slot.relaid:
            continue
        if id(weight) in keep_layout_of:
            kept.add(id(weight))
        elif _is_input_major(weight):
            _relay(model, weight, input_major=False)
    return kept
