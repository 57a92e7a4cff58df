"""FX machinery the passes share; no patterns, no rewrite decisions.

Matches nothing and emits nothing on its own: it reads example values, follows a weight operand
back through permuting views to its graph input, finds the nodes under autocast, appends static
inputs, copies a Dynamo graph module so a pass may edit it, and puts a new node in place of an old
one with its source location.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import fx

from ..linear_forms import view_dims
from ..sharding import is_dtensor, local_tensor


def example_value(node: Any) -> Any:
    """The fake (or real) value Dynamo recorded for ``node``; None for non-nodes."""
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


_VIEW_METHODS = ("t", "transpose", "permute", "swapaxes", "swapdims")
_VIEW_FUNCTIONS = {torch.t: "t", torch.transpose: "transpose", torch.permute: "permute"}


def _permuting_view(node: fx.Node) -> tuple[fx.Node, str, tuple[Any, ...]] | None:
    """(source, kind, extra args) if ``node`` is a permuting view op, else None."""
    if node.op == "call_method" and node.target in _VIEW_METHODS and node.args:
        return node.args[0], str(node.target), tuple(node.args[1:])
    if node.op == "call_function" and node.args:
        if node.target is getattr and len(node.args) == 2 and node.args[1] in ("T", "mT"):
            return node.args[0], node.args[1], ()
        kind = _VIEW_FUNCTIONS.get(node.target) if not isinstance(node.target, str) else None
        if kind is not None:
            return node.args[0], kind, tuple(node.args[1:])
    return None


def _is_to_local(node: fx.Node) -> bool:
    """``w.to_local()``: a tensor-parallel (DTensor) weight's local shard, same dims (``sharding``)."""
    return node.op == "call_method" and node.target == "to_local" and len(node.args) == 1


def weight_root(node: Any) -> tuple[fx.Node, tuple[int, ...]] | None:
    """The placeholder a weight operand views (or whose local shard it views: ``to_local``), and
    the root dim behind each of its dims."""
    dims: tuple[int, ...] | None = None
    while isinstance(node, fx.Node):
        if _is_to_local(node):
            node = node.args[0]
            continue
        if node.op == "placeholder":
            val = example_value(node)
            ndim = val.dim() if isinstance(val, torch.Tensor) else 0
            return node, dims if dims is not None else tuple(range(ndim))
        view = _permuting_view(node)
        if view is None or node.kwargs:
            return None
        source, kind, extra = view
        val = example_value(source)
        if not isinstance(val, torch.Tensor) or (step := view_dims(kind, val.dim(), extra)) is None:
            return None
        dims = step if dims is None else tuple(step[d] for d in dims)
        node = source
    return None


def nodes_under_autocast(graph: fx.Graph) -> set[fx.Node]:
    """Nodes under autocast: between Dynamo's ``_enter_autocast``/``_exit_autocast``, or all of
    them when the graph is compiled inside the caller's autocast context."""
    if any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda")):
        return set(graph.nodes)  # compiled inside the caller's autocast: the whole graph is
    inside: set[fx.Node] = set()
    enabled: list[bool] = []  # one entry per open autocast context: is it enabled?
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.amp._enter_autocast:
            args = list(node.args) + [None] * 3
            enabled.append(bool(node.kwargs.get("enabled", args[2] if args[2] is not None else True)))
        elif node.op == "call_function" and node.target is torch.amp._exit_autocast:
            if enabled:
                enabled.pop()
        elif enabled and enabled[-1]:
            inside.add(node)
    return inside


def local_operand(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """``node``, or ``node.to_local()`` (made at the insertion point) when it is a DTensor: the
    sparse ops compute on this rank's local shard, as the tensor-parallel engine's own forward does."""
    value = example_value(node)
    if not is_dtensor(value):
        return node
    local = graph.call_method("to_local", (node,))
    local.meta["example_value"] = local_tensor(value)
    return local


class GraphInputs:
    """The placeholders of a graph with their example inputs, and a way to append new ones."""

    def __init__(self, graph: fx.Graph, example_inputs: Sequence[Any]) -> None:
        self.graph = graph
        self.placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self.index_of = {n: i for i, n in enumerate(self.placeholders)}
        self.examples = example_inputs

    def example(self, node: Any) -> Any:
        """The example input a placeholder stands for (None for other nodes and appended inputs)."""
        i = self.index_of.get(node) if isinstance(node, fx.Node) else None
        return self.examples[i] if i is not None and i < len(self.examples) else None

    def append_static(self, name: str, example: torch.Tensor) -> fx.Node:
        """A new last placeholder the backend feeds at run time, static like a parameter.

        It has no user-code source (as DDPOptimizer's split graphs have), and is marked static so
        CUDA graphs do not copy it on every replay.
        """
        with self.graph.inserting_after(self.placeholders[-1]):
            node = self.graph.placeholder(name)
        node.meta["example_value"] = example
        node._dynamo_source = None
        node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
        self.index_of[node] = len(self.placeholders)
        self.placeholders.append(node)
        return node


def copy_dynamo_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a Dynamo graph module that a pass may edit.

    Dynamo keeps using its own graph after the backend returns (it reads each placeholder's
    ``grapharg``), so passes that add inputs must work on a copy. The copy keeps the metadata
    AOT autograd reads from Dynamo graphs (node ``_dynamo_source``, ``gm.meta``, param sources).
    """
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, val_map)
    graph.output(out)
    for old, new in val_map.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    copy = fx.GraphModule(gm, graph)
    for key, value in gm.__dict__.items():
        copy.__dict__.setdefault(key, value)
    copy.meta.update(gm.meta)
    return copy


#: Meta a replacement node takes from the node it replaces: errors then point at the model's line.
SOURCE_META = ("stack_trace", "nn_module_stack", "source_fn_stack")


def copy_source_meta(old: fx.Node, new: fx.Node, keys: Sequence[str] = SOURCE_META) -> None:
    """Copy the source location (and any other ``keys``) of ``old`` onto ``new``."""
    for key in keys:
        if key in old.meta:
            new.meta[key] = old.meta[key]


def replace_node(node: fx.Node, new: fx.Node) -> None:
    """Put ``new`` in place of ``node``, keeping its value meta, source location and module stack."""
    copy_source_meta(node, new, (*SOURCE_META, "example_value", "val"))
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)
