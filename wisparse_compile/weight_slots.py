"""Where planned weights live: slots keyed by plan name, stable where the tensors are not.

A model loaded with accelerate's big-model offloading (``from_pretrained(..., device_map=...,
offload_folder=...)``, ``accelerate.dispatch_model``) keeps some weights on disk or on the CPU
and its registered parameters on the meta device; an ``AlignDevicesHook`` puts a freshly loaded
``Parameter`` into the module for each forward and a new meta one after it. So a linear call's
weight is a different object every forward, and watching weights by identity misses every call
of an offloaded layer. A ``WeightSlot`` names the place instead (the module and its parameter
attribute); ``WatchedWeights`` tells which slot holds the tensor a call receives *now*, re-reading
the slots when an unknown parameter shows up (once per block accelerate loads). Nothing here loads
weights: accelerate's hooks do that, one block at a time, so calibration holds no more of the
model than the forward itself does.

Weights on the meta device that no hook loads cannot be calibrated (``check_loadable``), and a
plan cannot be attached to weights that are loaded per forward (``offloaded_weights``): both are
named in a clear error by their callers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .model_structure import find_weight

# (module, parameter attribute): one place a weight is registered
Place = tuple[nn.Module, str]


@dataclass(frozen=True)
class WeightSlot:
    """A planned weight by place: ``module._parameters[attr]`` for each of its ``places`` (a weight
    shared by several modules has several), under the plan key ``name``. Equal slots compare equal
    by name and module identity, so a slot is a stable dict key across forwards."""

    name: str
    places: tuple[Place, ...]

    def current(self) -> torch.Tensor | None:
        """The tensor the slot holds now (a meta placeholder between forwards of an offloaded layer)."""
        module, attr = self.places[0]
        return module._parameters.get(attr)


def weight_slots(model: nn.Module, names: Iterable[str]) -> dict[str, WeightSlot]:
    """Plan key -> slot for each name (``find_weight`` resolves ``name.weight`` or ``name``)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    by_param: dict[int, list[Place]] = {}
    for param_name, param in model.named_parameters(remove_duplicate=False):
        path, _, attr = param_name.rpartition(".")
        by_param.setdefault(id(param), []).append((modules[path], attr))
    slots: dict[str, WeightSlot] = {}
    for name in names:
        found = find_weight(model, name)
        if found is None:
            raise ValueError(f"{name!r} names no parameter of {type(model).__name__}: pass names from its named_parameters()")
        slots[name] = WeightSlot(name, tuple(by_param[id(found[1])]))
    return slots


class WatchedWeights:
    """tensor -> the slot holding it now, for an observer's ``watched`` test.

    A hit is an identity lookup (weak: a freed tensor's recycled ``id`` never matches). On a miss
    by an ``nn.Parameter`` the slots are read again, which picks up the weights an offloading hook
    has just loaded (a resident model's weights are all found on the first miss). Activations are
    never parameters, so they cost one ``isinstance``."""

    def __init__(self, slots: Iterable[WeightSlot]) -> None:
        self.slots = tuple(slots)
        self._held: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def slot_of(self, tensor: Any) -> WeightSlot | None:
        if not isinstance(tensor, nn.Parameter):
            return None
        slot = self._held.get(tensor)
        if slot is None:
            self._refresh()
            slot = self._held.get(tensor)
        return slot

    def __call__(self, tensor: Any) -> bool:
        return self.slot_of(tensor) is not None

    def _refresh(self) -> None:
        for slot in self.slots:
            for module, attr in slot.places:
                tensor = module._parameters.get(attr)
                if tensor is not None and tensor not in self._held:
                    self._held[tensor] = slot


def _offload_hooks(hook: Any) -> list[Any]:
    """The accelerate hooks in ``hook`` that load offloaded weights (``AlignDevicesHook(offload=True)``),
    looking inside a ``SequentialHook``."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook  # present whenever a module has _hf_hook

    if isinstance(hook, SequentialHook):
        return [h for inner in hook.hooks for h in _offload_hooks(inner)]
    return [hook] if isinstance(hook, AlignDevicesHook) and hook.offload and hook.weights_map is not None else []


def _loader_of(model: nn.Module, param_name: str) -> nn.Module | None:
    """The module whose accelerate hook loads ``param_name`` for each forward, or None.

    A hook on the parameter's own module loads it; one on an ancestor loads it if it places
    submodules (``place_submodules``)."""
    path = param_name.rpartition(".")[0]
    parts = path.split(".") if path else []
    module: nn.Module = model
    for depth in range(len(parts) + 1):
        hooks = _offload_hooks(module._hf_hook) if hasattr(module, "_hf_hook") else []
        if any(depth == len(parts) or h.place_submodules for h in hooks):
            return module
        if depth < len(parts):
            module = getattr(module, parts[depth])
    return None


def check_loadable(model: nn.Module) -> None:
    """Raise a clear error if a parameter sits on the meta device and no accelerate hook loads it.

    Such a model was never given its weights (built under ``init_empty_weights`` / on
    ``device="meta"``, or its hooks were removed); running it could only fail or give meta outputs."""
    missing = [n for n, p in model.named_parameters() if p.is_meta and _loader_of(model, n) is None]
    if missing:
        raise ValueError(
            f"{len(missing)} parameters of {type(model).__name__} (e.g. {missing[0]!r}) are on the meta device and "
            "no accelerate hook loads them at forward time, so the model cannot run: load its weights "
            "(from_pretrained(path)), or let accelerate offload them: from_pretrained(path, device_map='auto', "
            "offload_folder=DIR) or accelerate.dispatch_model(model, device_map, offload_dir=DIR)"
        )


def offloaded_weights(model: nn.Module, names: Iterable[str]) -> list[str]:
    """The plan keys among ``names`` whose weights accelerate loads per forward (not resident)."""
    out = []
    for name in names:
        found = find_weight(model, name)
        if found is not None and found[1].is_meta and _loader_of(model, found[0]) is not None:
            out.append(name)
    return out


def require_resident(model: nn.Module, names: Iterable[str]) -> None:
    """Raise a clear error if any of ``names`` is offloaded: a plan is attached to weights in memory.

    Offloaded weights are new tensors each forward, so no threshold could follow them to the sparse
    op; the plan calibrated on the offloaded model applies to the same model loaded resident."""
    offloaded = offloaded_weights(model, names)
    if offloaded:
        raise ValueError(
            f"{len(offloaded)} planned weights of {type(model).__name__} (e.g. {offloaded[0]!r}) are offloaded by "
            "accelerate (loaded from disk or CPU for each forward), so no plan can follow them to the sparse op: "
            "attach the plan (plan.save(...) / SparsityPlan.load(...)) to the model loaded without offloading, "
            "e.g. from_pretrained(path) or a device_map that puts every layer on a device (not 'disk', and not "
            "'cpu' when the layers run on a GPU)"
        )
