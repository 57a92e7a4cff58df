"""The allocation's view of a model: repeated blocks, and groups of linears that share an input.

Both are found generically. Blocks are ``model_structure.repeated_block_prefixes``. Linears share
an input when the *same tensor object* feeds several of them in one forward (attention's
projections of one normed hidden state, a gated MLP's two input projections); a weak reference
per observed input tells a reused object from a new one that got a recycled ``id``.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..linear_forms import call_operands, form_of
from ..model_structure import find_weight, repeated_block_prefixes

log = logging.getLogger(__name__)


@dataclass
class Block:
    """One repeated block: its module, its planned linears grouped by shared input."""

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


class _InputSharing(TorchFunctionMode):
    """Records, per watched linear, the first linear whose call received the same input object."""

    def __init__(self, watched: Mapping[int, str]) -> None:
        super().__init__()
        self.watched = watched
        self.inputs: dict[int, tuple[weakref.ReferenceType, str]] = {}
        self.leader: dict[str, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        form = form_of(func)
        if form is not None:
            x, weight, _ = call_operands(form, args, kwargs)
            name = self.watched.get(id(weight))
            if name is not None and isinstance(x, torch.Tensor) and name not in self.leader:
                seen = self.inputs.get(id(x))
                if seen is not None and seen[0]() is x:
                    self.leader[name] = self.leader.get(seen[1], seen[1])
                else:
                    self.inputs[id(x)] = (weakref.ref(x), name)
                    self.leader[name] = name
        return func(*args, **(kwargs or {}))


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
    raise TypeError(f"a repeated block returned {type(output).__name__}; expected a tensor or a tuple starting with one")


def model_call_kwargs(model: nn.Module) -> dict[str, Any]:
    """``use_cache=False`` where the model takes it: captured block calls must not carry a KV cache."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def call_model(model: nn.Module, batch: Any, device: torch.device) -> Any:
    """Run one calibration batch (dict of tensors or input_ids) and return the model's output."""
    extra = model_call_kwargs(model)
    if isinstance(batch, Mapping):
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return model(**{**extra, **inputs})
    if isinstance(batch, torch.Tensor):
        ids = batch.to(device)
        return model(ids.unsqueeze(0) if ids.dim() == 1 else ids, **extra)
    raise TypeError(f"a calibration batch must be a dict of tensors or an input_ids tensor, got {type(batch).__name__}")


def _plain(value: Any) -> Any:
    """Keep tensors and plain values for a block re-run; stateful objects (caches) become None."""
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    return None


def discover_layout(
    model: nn.Module, names: Iterable[str], batches: list[Any], device: torch.device
) -> tuple[Layout, dict[str, BlockCalls]]:
    """Group planned linears into blocks and input-sharing groups; capture dense block calls.

    One dense pass over ``batches`` (no grad) does both: the first batch shows which linears share
    inputs, and every batch records each block's inputs and output for reconstruction errors.
    """
    names = list(names)
    weights = {name: find_weight(model, name) for name in names}
    watched = {id(found[1]): name for name, found in weights.items() if found is not None}
    prefixes = repeated_block_prefixes(model)
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
        with torch.no_grad():
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
        log.info("%d planned linears lie outside the repeated blocks; they keep the target sparsity", len(outside))
    return Layout(blocks, outside), {b.prefix: captured[b.prefix] for b in blocks}
