"""The allocation's view of a model: its blocks, and groups of linears that share an input.

Both are found generically. Blocks are the layers, in any of the model's layer lists, that hold
planned linears (``model_structure.block_prefixes``): by default the layers that decode, wherever
``SparsityConfig.include`` points otherwise, whatever their classes: a hybrid's attention and
state-space layers are blocks alike, each re-run with its own captured calls. Linears share an input when
the *same data* feeds several of them in one forward (attention's projections of one normed hidden
state, a gated MLP's two input projections), whether each receives the tensor itself or its own view
of it (``x.view(-1, d)`` per call), and whatever form the call takes (``x @ W.T`` included:
``observer.LinearObserver`` resolves it); a weak reference per observed input tells a reused tensor
from a new one that got a recycled ``id``.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..model_io import call_model
from ..model_structure import block_prefixes, find_weight
from ..observer import LinearCall, LinearObserver
from ..weight_slots import WatchedWeights, WeightSlot, weight_slots
from .masking import candidate_masks

log = logging.getLogger(__name__)


@dataclass
class Block:
    """One layer holding planned linears: its module, those linears grouped by shared input."""

    prefix: str
    module: nn.Module
    groups: list[list[str]]
    sizes: dict[str, int]  # linear name -> weight numel

    @property
    def linears(self) -> list[str]:
        return [n for g in self.groups for n in g]

    @property
    def size(self) -> int:
        return sum(self.sizes.values())

    def group_size(self, group: list[str]) -> int:
        return sum(self.sizes[n] for n in group)


@dataclass
class Layout:
    """Blocks with planned linears, and planned linears outside every block (kept at the target)."""

    blocks: list[Block]
    outside: list[str] = field(default_factory=list)


def _data_key(x: torch.Tensor) -> tuple[torch.Tensor, tuple[Any, ...]]:
    """(tensor owning the memory, which view of it): equal for ``x`` and for a view of the same data."""
    base = x._base if x._base is not None else x
    return base, (x.storage_offset(), tuple(x.shape), tuple(x.stride()), x.dtype)


class _InputSharing(LinearObserver):
    """Records, per watched linear, the first linear whose call received the same input data."""

    def __init__(self, watched: WatchedWeights) -> None:
        super().__init__(watched)
        self.watched = watched
        self.inputs: dict[tuple[int, tuple[Any, ...]], tuple[weakref.ReferenceType, str]] = {}
        self.leader: dict[str, str] = {}

    def on_linear(self, call: LinearCall) -> None:
        name = self.watched.slot_of(call.weight).name  # type: ignore[union-attr]
        if name in self.leader:
            return None
        base, view = _data_key(call.x)
        key = (id(base), view)
        seen = self.inputs.get(key)
        if seen is not None and seen[0]() is base:
            self.leader[name] = self.leader.get(seen[1], seen[1])
        else:
            self.inputs[key] = (weakref.ref(base), name)
            self.leader[name] = name
        return None


@dataclass
class BlockCalls:
    """A block's dense calls on refinement tokens: inputs (args, kwargs) and first output tensor."""

    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)


def first_tensor(output: Any) -> torch.Tensor:
    """The hidden state a block returns (a tensor, or the first element of a tuple/list)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"a decoder layer returned {type(output).__name__}; expected a tensor or a tuple starting with one")


def _plain(value: Any) -> Any:
    """Keep tensors and plain values for a block re-run; stateful objects (caches) become None."""
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    return None


def discover_layout(
    model: nn.Module, names: Iterable[str], batches: list[Any], device: torch.device,
    masks: Mapping[WeightSlot, torch.Tensor] | None = None,
) -> tuple[Layout, dict[str, BlockCalls]]:
    """Group planned linears into blocks and input-sharing groups; capture dense block calls.

    One dense pass over ``batches`` (no grad) does both: the first batch shows which linears share
    inputs, and every batch records each block's inputs and output for reconstruction errors.
    With ``masks`` (``masking.candidate_masks`` thresholds) the pass runs the masked model: the
    calls are what a sparse model feeds each block (the grouping is then not meaningful: masked
    linears get inputs of their own).
    """
    names = list(names)
    weights = {name: find_weight(model, name) for name in names}
    watched = WatchedWeights(weight_slots(model, [n for n, found in weights.items() if found is not None]).values())
    prefixes = block_prefixes(model, names)
    captured: dict[str, BlockCalls] = {p: BlockCalls() for p in prefixes}
    handles = []
    for prefix in prefixes:
        module = model.get_submodule(prefix[:-1])

        def pre_hook(mod, args, kwargs, _calls=captured[prefix]):
            _calls.calls.append((_plain(tuple(args)), {k: _plain(v) for k, v in kwargs.items()}))

        def post_hook(mod, args, kwargs, output, _calls=captured[prefix]):
            _calls.outputs.append(first_tensor(output).detach())

        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook, with_kwargs=True))
    sharing = _InputSharing(watched)
    try:
        with torch.no_grad(), (candidate_masks(masks) if masks else contextlib.nullcontext()):
            for i, batch in enumerate(batches):
                if i == 0:
                    with sharing:
                        call_model(model, batch, device)
                else:
                    call_model(model, batch, device)
    finally:
        for h in handles:
            h.remove()
    blocks: list[Block] = []
    placed: set[str] = set()
    for prefix in prefixes:
        members = [n for n in names if (n + ".").startswith(prefix)]
        if not members:
            continue
        groups: dict[str, list[str]] = {}
        for n in members:
            groups.setdefault(sharing.leader.get(n, n), []).append(n)
        sizes = {n: int(weights[n][1].numel()) for n in members}  # type: ignore[index]
        blocks.append(Block(prefix, model.get_submodule(prefix[:-1]), list(groups.values()), sizes))
        placed.update(members)
    outside = [n for n in names if n not in placed]
    if outside:
        log.info("%d planned linears lie outside every layer list; they keep the target sparsity", len(outside))
    return Layout(blocks, outside), {b.prefix: captured[b.prefix] for b in blocks}
