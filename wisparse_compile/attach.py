"""attach / detach: a model carries its plan, and each planned weight knows its thresholds.

Compiled graphs take parameters as inputs and Dynamo does not guard on their identity, so one
graph may run for several model instances (or, after a graph break, several layers). Thresholds
therefore travel with the *weight tensor actually passed*: a process-wide registry maps each
planned Parameter to its site record (plan entry, fp32 thresholds, target sparsity).

The thresholds are not module buffers: ``model.to(torch.bfloat16)`` / ``.half()`` would cast
them (masks would shift; in fp16 large thresholds become inf). They stay fp32, and follow their
weight to another device once, on first use there (``thresholds_of``), never per call.
"""

from __future__ import annotations

import logging
import operator
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .experts import make_experts_traceable
from .kernels import input_major_gemm_is_slow
from .kernels.layout import input_major as input_major_copy, padded_row_length
from .model_structure import find_weight
from .plan import PlanError, SparsityPlan
from .sharding import ShardingError, describe, is_dtensor, local_tensor, local_thresholds, tensor_parallel_size
from .weight_slots import require_resident
from .config import QuantizeConfig
from .quant.model import dequantize_model, quantization_of, quantize_model

log = logging.getLogger(__name__)


class _Site:
    """A planned weight's record: its plan entry, fp32 thresholds, and whether attach re-laid it."""

    __slots__ = ("name", "in_dim", "sparsity", "relaid", "model", "_thresholds")

    def __init__(
        self, name: str, in_dim: int, sparsity: float, thresholds: torch.Tensor, relaid: bool, model: nn.Module
    ) -> None:
        self.name = name
        self.in_dim = in_dim
        self.sparsity = sparsity
        self.relaid = relaid  # attach re-laid the weight input-major; detach lays it back
        self.model = weakref.ref(model)  # the model the plan was attached to
        self._thresholds = {thresholds.device: thresholds}  # one fp32 copy per device used

    def thresholds_on(self, device: torch.device) -> torch.Tensor:
        """The fp32 thresholds on ``device``: copied there once, then the same tensor every call."""
        t = self._thresholds.get(device)
        if t is None:
            t = self._thresholds[device] = next(iter(self._thresholds.values())).to(device)
        return t


_SITES: WeakIdKeyDictionary = WeakIdKeyDictionary()
_UNSLICEABLE: WeakIdKeyDictionary = WeakIdKeyDictionary()  # planned sharded weight -> why it runs dense
_LOCAL_SHARDS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # local shard of a planned DTensor weight -> site
_PLANS: "weakref.WeakKeyDictionary[nn.Module, SparsityPlan]" = weakref.WeakKeyDictionary()
_generation = 0


def attach_generation() -> int:
    """Counter bumped whenever any weight's plan changes (attach, detach, ``unplanned``)."""
    return _generation


def _bump_generation() -> None:
    global _generation
    _generation += 1


def any_attached() -> bool:
    """Cheap check used on hot paths: is any plan attached anywhere in this process?"""
    return len(_SITES) > 0


def site_of(weight: object) -> _Site | None:
    """The site record of a planned weight, or None (also for non-tensors).

    A tensor-parallel weight's local shard is registered too, and so is found any view of it that
    keeps its shape and strides: what a DTensor parameter's ``to_local()`` returns in eager mode
    (a fresh view per call on torch 2.13), so the eager masked reference sees the local shard.
    """
    try:
        site = _SITES.get(weight)
    except TypeError:
        return None
    if site is None and _LOCAL_SHARDS and isinstance(weight, torch.Tensor):
        base = weight._base
        if base is not None and base.shape == weight.shape and base.stride() == weight.stride():
            site = _LOCAL_SHARDS.get(base)
    return site


def _register(weight: torch.Tensor, site: _Site) -> None:
    _SITES[weight] = site
    if is_dtensor(weight):
        _LOCAL_SHARDS[local_tensor(weight)] = site
        _SITES[local_tensor(weight)] = site


def _unregister_weight(weight: torch.Tensor) -> _Site | None:
    if is_dtensor(weight):
        _LOCAL_SHARDS.pop(local_tensor(weight), None)
        _SITES.pop(local_tensor(weight), None)
    return _SITES.pop(weight, None)


def thresholds_of(weight: torch.Tensor) -> torch.Tensor | None:
    """The fp32 thresholds of a planned weight, on its device; None if it has no plan."""
    site = site_of(weight)
    return None if site is None else site.thresholds_on(weight.device)


def sharding_problem(weight: object) -> str | None:
    """Why a planned tensor-parallel weight runs dense (its shard takes no slice of the thresholds), or None."""
    try:
        return _UNSLICEABLE.get(weight)
    except TypeError:
        return None


def planned_sparsity(weight: object) -> float | None:
    """The target sparsity the attached plan gives ``weight``; None if it has no plan."""
    site = site_of(weight)
    return None if site is None else site.sparsity


def attached_plan(model: nn.Module) -> SparsityPlan | None:
    return _PLANS.get(model)


@contextmanager
def unplanned(weights: Iterable[torch.Tensor]) -> Iterator[None]:
    """While active, ``weights`` have no plan: compiled graphs and ``masked_linears`` run them dense.

    For references that mask some linears and not others; the plan comes back on exit.
    """
    saved = [(w, site) for w in weights if (site := _SITES.get(w)) is not None]
    for w, _ in saved:
        _unregister_weight(w)
    _bump_generation()
    try:
        yield
    finally:
        for w, site in saved:
            _register(w, site)
        _bump_generation()


class WeightLayoutChanged(RuntimeError):
    """A compiled graph met a weight of another type, dtype, shape or layout than it was compiled for."""


def weight_layout(weight: Any) -> tuple:
    """What a compiled graph assumes of a weight: its type, dtype, shape and strides."""
    if not isinstance(weight, torch.Tensor):
        return (type(weight),)
    return (type(weight), weight.dtype, tuple(weight.shape), tuple(weight.stride()))


def _describe(layout: tuple) -> str:
    if len(layout) == 1:
        return layout[0].__name__
    kind, dtype, shape, stride = layout
    return f"{kind.__name__} {str(dtype).removeprefix('torch.')} {list(shape)} strides {list(stride)}"


class ThresholdFeed:
    """The thresholds of the weights at fixed argument positions, for a compiled graph's extra inputs.

    Resolved once per (weight objects, ``attach_generation()``): a steady decode step costs one
    identity check of the weight arguments (C-level, no registry lookups) and gets the same tensor
    objects step to step (CUDA graphs need stable input addresses). The weights of the last
    resolution are held only while their model lives (a weak reference to it drops them). A weight
    with no plan gets zero thresholds (runs dense), and ``on_unplanned`` is called; such calls are
    resolved again each time (the backend warns once about them).

    ``compiled_weights`` (the weights the graph was compiled for) make each resolution check that
    the weights passed still have their type, dtype, shape and strides: Dynamo's guards recompile
    before that could differ, unless the model was compiled with a guard filter that skips module
    guards (``decode_compile_options``); then a weight swapped under the compiled graph (``detach``,
    a new ``weights=`` mode) raises ``WeightLayoutChanged`` instead of running on a wrong layout.
    """

    def __init__(
        self, positions: Sequence[int], examples: Sequence[torch.Tensor], on_unplanned: Callable[[], None],
        compiled_weights: Sequence[torch.Tensor] = (),
    ) -> None:
        self._layouts = [weight_layout(w) for w in compiled_weights]
        self._examples = list(examples)
        self._on_unplanned = on_unplanned
        get = operator.itemgetter(*positions) if positions else (lambda args: ())
        self._weights_of: Callable[[Sequence[Any]], tuple] = (lambda args: (get(args),)) if len(positions) == 1 else get
        self._weights: tuple | None = None  # the weights resolved last, while cacheable
        self._generation = -1
        self._thresholds: tuple[torch.Tensor, ...] = ()
        self._model_refs: list[weakref.ref] = []
        self._zeros: dict[tuple[int, torch.device], torch.Tensor] = {}

    def __call__(self, args: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        weights = self._weights_of(args)
        cached = self._weights
        if cached is None or self._generation != _generation or not all(map(operator.is_, weights, cached)):
            self._resolve(weights)
        return self._thresholds

    def bind(self, compiled: Callable[..., Any]) -> Callable[..., Any]:
        """``compiled`` called with the thresholds appended to its arguments: ``__call__`` inlined
        into one frame, since this runs before every call of the compiled graph."""
        weights_of, is_ = self._weights_of, operator.is_

        def run(*args: Any) -> Any:
            weights = weights_of(args)
            cached = self._weights
            if cached is None or self._generation != _generation or not all(map(is_, weights, cached)):
                self._resolve(weights)
            return compiled(*(args + self._thresholds))

        return run

    def _forget(self, _ref: object = None) -> None:
        self._weights, self._thresholds = None, ()  # the model died: let its weights and thresholds go

    def _resolve(self, weights: tuple) -> None:
        for j, (weight, layout) in enumerate(zip(weights, self._layouts)):
            if weight_layout(weight) != layout:
                raise WeightLayoutChanged(
                    f"wisparse: weight {j} of a compiled graph was {_describe(layout)} when compiled and is now "
                    f"{_describe(weight_layout(weight))} (detached, or attached with another weights= mode). "
                    "Dynamo's guards would recompile, but this model was compiled with a guard filter that skips "
                    "module guards: call torch._dynamo.reset() and compile again after changing weights"
                )
        thresholds: list[torch.Tensor] = []
        models: dict[int, nn.Module] = {}
        unplanned_weights, orphaned = 0, False
        for j, weight in enumerate(weights):
            site = site_of(weight)
            model = site.model() if site is not None else None
            if model is not None:
                models[id(model)] = model
            elif site is not None:
                orphaned = True  # its model is gone: nothing would let the weight go
            if site is not None:
                thresholds.append(site.thresholds_on(weight.device))
                continue
            unplanned_weights += 1
            t = self._zeros.get((j, weight.device))
            if t is None:
                t = self._zeros[(j, weight.device)] = torch.zeros_like(self._examples[j], device=weight.device)
            thresholds.append(t)
        # cacheable when every weight is planned on a live model (whose death then lets them go)
        cacheable = not unplanned_weights and not orphaned
        self._thresholds = tuple(thresholds)
        self._generation = _generation
        self._weights = weights if cacheable else None
        self._model_refs = [weakref.ref(m, self._forget) for m in models.values()] if cacheable else []
        if unplanned_weights:
            self._on_unplanned()


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


def _site_thresholds(name: str, weight: torch.Tensor, plan: SparsityPlan, in_dim: int) -> torch.Tensor | None:
    """The fp32 thresholds ``weight`` computes with: the plan's, or its shard's slice of them (a
    tensor-parallel DTensor weight, ``sharding.local_thresholds``). None, with the reason kept for
    the compile report and one warning, when the shard takes no slice: that linear runs dense."""
    thresholds = plan.channel_thresholds[name].detach().to(weight.device, torch.float32)
    try:
        thresholds = local_thresholds(name, weight, thresholds, in_dim)
    except ShardingError as e:
        _UNSLICEABLE[weight] = str(e)
        log.warning("wisparse: %s; this linear runs dense", e)
        return None
    if is_dtensor(weight):
        log.debug("%s: %s, thresholds %s", name, describe(weight), list(thresholds.shape))
    return thresholds


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
    if quantize is not None:  # the previous plan off the float weights, then swap in quantized ones (sites go on those)
        _unregister(model, keep_layout_of=set())
        previous = quantization_of(model)
        if previous is not None and previous.format != quantize.weights:
            dequantize_model(model)  # another format: back to float, never codes re-quantized
        quantize_model(model, plan.names, quantize, in_dims=plan.in_dims)
    weights = [(name, find_weight(model, name)[1]) for name in plan.names]  # type: ignore[index]
    still_planned = {id(w) for _, w in weights if w.dim() == 2} if input_major else set()
    kept_input_major = _unregister(model, keep_layout_of=still_planned)
    # laying a weight back may have put a new (tensor-parallel) parameter in its place: look again
    weights = [(name, find_weight(model, name)[1]) for name in plan.names]  # type: ignore[index]
    for name, weight in weights:
        in_dim = plan.in_dims[name] % weight.dim()
        thresholds = _site_thresholds(name, weight, plan, in_dim)
        if thresholds is None:
            continue
        relaid = id(weight) in kept_input_major
        if input_major and weight.dim() == 2 and in_dim == 1 and local_tensor(weight).stride(0) != 1:
            weight = _relay(model, weight, input_major=True)
            relaid = True
            _warn_slow_eager_layout(local_tensor(weight))
        _register(weight, _Site(name, in_dim, float(plan.sparsities[name]), thresholds, relaid, model))
    _PLANS[model] = plan
    _bump_generation()
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
    """Drop ``model``'s sites; lay re-laid weights back unless their id is in ``keep_layout_of``.

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
        _UNSLICEABLE.pop(weight, None)
        site = _unregister_weight(weight)
        if site is None or not site.relaid:
            continue
        if id(weight) in keep_layout_of:
            kept.add(id(weight))
        elif _is_input_major(weight):
            _relay(model, weight, input_major=False)
    _bump_generation()
    return kept
