"""The sibling-fusion pass: float sparse linears that read one input become one ``sparse_linear_group``
over a concatenated weight.

Matches: ``wisparse::sparse_linear`` nodes of float weights (emitted by ``rewrite_sparse_linears``) that read the
same input (q/k/v, gate/up; in a mixture-of-experts block, the shared expert's projections, its
output gate and the router: found by dataflow, not by names), the same ``max_sparse_rows``, a
weight that is a graph input (directly or as its ``t()`` view) of one dtype and device, and a
bias that is a graph input or None. "The same input" is one node ``x``, reached directly or
through ``view``/``reshape`` calls that change neither shape nor dtype (a block that flattens its
input to ``[tokens, hidden]`` and passes it on, where a callee flattens it again). Groups of 2+
are cut into chunks of at most ``MAX_SEGMENTS``.

Stacked expert contractions (``sparse_experts``) are never siblings: each
stacked weight (a fused gate/up stack included) is already one op, and it reads the routed,
expert-sorted rows, which no other projection reads.

Emits: ``f = wisparse.sparse_linear_group(x, [w...], [b...], [t...], rows, "float", [None...],
[out...], fused_weight)`` before
the group's first member (a weight stored ``[in, out]`` enters as a ``t()`` view made right there,
since a later member's own view comes after that point), and each member becomes
``split(f, sizes, -1)[i]``. ``fused_weight`` is a new graph input appended after the threshold
inputs. Views left without users are removed.

Why an extra input (and not re-pointing the parameters into one buffer): Dynamo guards and
Inductor's generated code assume the strides the parameters had when traced; making them views
into a concatenated buffer changes their strides (``(1, sum(out))`` instead of ``(1, out)``) after
tracing. So the backend prepares the concatenated input-major weight once per weight tuple (at
compile time, cached, rebuilt only if a weight is modified or replaced) and feeds it at run time
keyed by the weights actually passed, like the thresholds. Cost: one extra copy of the fused
weights in memory, which is why ``BackendConfig.fuse_siblings`` is off by default.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils.weak import WeakIdKeyDictionary

from ..kernels import MAX_SEGMENTS, Layout
from ..kernels.layout import input_major
from .decisions import LinearDecision, Outcome, RewriteResult
from .graph_utils import SOURCE_META, GraphInputs, copy_source_meta, example_value

log = logging.getLogger(__name__)


@dataclass
class FusedGroup:
    """One fused call: the graph-input indices of its weights (in output order) and its node."""

    weight_inputs: tuple[int, ...]
    transposed: tuple[bool, ...]
    node: str
    members: list[str] = field(default_factory=list)


@dataclass
class FusionResult:
    """The fused groups of a graph, and the prepared weights used as example inputs."""

    groups: list[FusedGroup] = field(default_factory=list)
    examples: list[torch.Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class SparseLinearCall:
    """The arguments of a ``wisparse::sparse_linear`` node, defaults filled in."""

    x: Any
    weight: Any
    bias: Any
    thresholds: Any
    rows: int
    layout: Layout
    scale: Any = None
    out_features: int | None = None


def sparse_linear_call(node: fx.Node) -> SparseLinearCall | None:
    """The call ``node`` makes if it is a ``wisparse::sparse_linear`` node (positional arguments, as
    ``rewrite_linears`` emits them), else None."""
    if node.op != "call_function" or node.target is not torch.ops.wisparse.sparse_linear.default or node.kwargs:
        return None
    x, weight, bias, thresholds, rows, *rest = node.args
    defaults = (Layout.FLOAT.value, None, None)
    layout, scale, out_features = (*rest, *defaults[len(rest):])
    return SparseLinearCall(x, weight, bias, thresholds, rows, Layout(layout), scale, out_features)


def _weight_input(node: Any, index_of: dict[fx.Node, int]) -> int | None:
    """Graph-input index of a sparse_linear weight operand (the parameter or its ``t()``)."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.t:
        node = node.args[0]
    return index_of.get(node) if isinstance(node, fx.Node) else None


def _identity_view_source(node: fx.Node) -> fx.Node | None:
    """The tensor ``node`` views, if ``node`` is a ``view``/``reshape`` keeping its shape and dtype."""
    is_reshape = (node.op == "call_method" and node.target in ("view", "reshape")) or (
        node.op == "call_function" and node.target is torch.reshape
    )
    if not is_reshape or node.kwargs or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source = node.args[0]
    out, src = example_value(node), example_value(source)
    if not (isinstance(out, torch.Tensor) and isinstance(src, torch.Tensor)):
        return None
    if out.dtype != src.dtype or out.dim() != src.dim():
        return None
    if not all(statically_known_true(a == b) for a, b in zip(out.shape, src.shape)):
        return None
    return source


def same_input(x: Any) -> Any:
    """The node whose value ``x`` is: ``x`` itself, or the source of its shape-keeping views."""
    while isinstance(x, fx.Node) and (source := _identity_view_source(x)) is not None:
        x = source
    return x


def erase_dead_views(node: Any, root: Any) -> None:
    """Remove ``node`` and the views above it (up to ``root``) once nothing uses them."""
    while isinstance(node, fx.Node) and node is not root and not node.users:
        source = _identity_view_source(node)
        if source is None:
            return
        node.graph.erase_node(node)
        node = source


def member_outputs(graph: fx.Graph, combined: fx.Node, chunk: list[fx.Node], sizes: list[int]) -> list[fx.Node]:
    """``split(combined, sizes, -1)[i]`` for each member of ``chunk``, at the insertion point, each
    carrying its member's source and value meta (the combined call's outputs, member by member)."""
    parts = graph.call_function(torch.split, (combined, sizes), {"dim": -1})
    outs = []
    for i, member in enumerate(chunk):
        out = graph.call_function(operator.getitem, (parts, i))
        copy_source_meta(member, out, (*SOURCE_META, "example_value", "val"))
        outs.append(out)
    return outs


def mark_sibling(decision: LinearDecision | None, node: str, count: int) -> None:
    """Record that a linear now runs as one of ``count`` siblings in ``node``: a sparse one becomes
    FUSED; a dense one (an unplanned quantized member) keeps its outcome, its reason gains a note."""
    if decision is None:
        return
    note = f"one of {count} siblings in {node}"
    if decision.decision == Outcome.SPARSE:
        decision.decision, decision.reason = Outcome.FUSED, note
    else:
        decision.reason = f"{decision.reason}; {note}"
    decision.node = node


# Keyed by the first weight (weakly, by identity), then by the whole tuple.
_PREPARED: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def fused_weight(weights: Sequence[torch.Tensor], transposed: Sequence[bool]) -> torch.Tensor:
    """The weights as ``[out, in]`` (``t()`` of those ``transposed``, stored ``[in, out]``),
    concatenated along out and stored input-major; cached per weight tuple.

    Built once (at compile time, when the backend makes its example input); later calls return the
    cached buffer unless a weight was modified in place or its data replaced, then it is rebuilt.
    """
    key = tuple(id(w) for w in weights) + tuple(transposed)
    stamp = tuple((w.data_ptr(), w._version) for w in weights)
    per_first = _PREPARED.setdefault(weights[0], {})
    cached = per_first.get(key)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    with torch.no_grad():
        parts = [w.detach().t() if tr else w.detach() for w, tr in zip(weights, transposed)]
        buffer = input_major(torch.cat(parts, dim=0))
    if cached is not None:
        log.info("wisparse: rebuilt a fused weight %s (a sibling weight changed)", tuple(buffer.shape))
    per_first[key] = (stamp, buffer)
    return buffer


def fuse_sibling_linears(gm: fx.GraphModule, example_inputs: Sequence[Any], result: RewriteResult) -> FusionResult:
    """Fuse sibling float ``sparse_linear`` nodes of ``gm`` in place; see the module docstring."""
    graph = gm.graph
    inputs = GraphInputs(graph, example_inputs)
    by_input: dict[tuple[fx.Node, int], list[fx.Node]] = {}
    for node in graph.nodes:
        call = sparse_linear_call(node)
        if call is None or call.layout is not Layout.FLOAT:
            continue
        wi = _weight_input(call.weight, inputs.index_of)
        if wi is None or not (call.bias is None or call.bias in inputs.index_of):
            continue
        by_input.setdefault((same_input(call.x), call.rows), []).append(node)

    fusion = FusionResult()
    decisions = {d.node: d for d in result.report.decisions}
    for (x, rows), nodes in by_input.items():
        # Same dtype and device only: one kernel, one buffer.
        kinds: dict[tuple[Any, Any], list[fx.Node]] = {}
        for n in nodes:
            w = inputs.example(inputs.placeholders[_weight_input(n.args[1], inputs.index_of)])
            kinds.setdefault((w.dtype, w.device), []).append(n)
        for members in kinds.values():
            for start in range(0, len(members), MAX_SEGMENTS):
                chunk = members[start : start + MAX_SEGMENTS]
                if len(chunk) >= 2:
                    fusion.groups.append(_fuse(graph, chunk, x, rows, inputs, fusion.examples, decisions))
    if fusion.groups:
        graph.lint()
        gm.recompile()
        log.info("wisparse: fused %d sibling groups (%d linears)", len(fusion.groups), sum(len(g.members) for g in fusion.groups))
    return fusion


def _weight_operand_here(graph: fx.Graph, operand: fx.Node) -> fx.Node:
    """``operand`` (a weight placeholder or its ``t()``), usable at the graph's insertion point.

    A member's ``t()`` view sits just before that member, which may come after the fused call:
    a transposed weight gets a new ``t()`` here (the member's own goes with the member).
    """
    if operand.op == "placeholder":
        return operand
    view = graph.call_function(torch.t, (operand.args[0],))
    view.meta["example_value"] = example_value(operand)
    return view


def _fuse(
    graph: fx.Graph, chunk: list[fx.Node], x: fx.Node, rows: int, inputs: GraphInputs,
    examples: list[torch.Tensor], decisions: dict[str, LinearDecision],
) -> FusedGroup:
    """One ``sparse_linear_group`` over a fused weight before ``chunk[0]`` in place of the members of ``chunk``."""
    weight_inputs = tuple(_weight_input(n.args[1], inputs.index_of) for n in chunk)
    transposed = tuple(n.args[1].op == "call_function" for n in chunk)
    weights = [inputs.examples[i] for i in weight_inputs]
    example = fused_weight(weights, transposed)
    fw_node = inputs.append_static(f"wisparse_fused_weight_{len(examples)}", example)
    examples.append(example)
    splits = [w.shape[1 if tr else 0] for w, tr in zip(weights, transposed)]
    with graph.inserting_before(chunk[0]):
        operands = [_weight_operand_here(graph, n.args[1]) for n in chunk]
        fused = graph.call_function(
            torch.ops.wisparse.sparse_linear_group.default,
            (x, operands, [n.args[2] for n in chunk], [n.args[3] for n in chunk], rows, Layout.FLOAT.value,
             [None] * len(chunk), splits, fw_node),
        )
        copy_source_meta(chunk[0], fused, ("stack_trace", "nn_module_stack"))
        outs = member_outputs(graph, fused, chunk, splits)
    group = FusedGroup(weight_inputs=weight_inputs, transposed=transposed, node=fused.name)
    for member, out in zip(chunk, outs):
        member_x, member_w = member.args[0], member.args[1]
        member.replace_all_uses_with(out)
        mark_sibling(decisions.get(member.name), fused.name, len(chunk))
        group.members.append(member.name)
        graph.erase_node(member)
        if member_w.op != "placeholder" and not member_w.users:
            graph.erase_node(member_w)
        erase_dead_views(member_x, x)
    return group


def with_fused_weights(compiled: Callable[..., Any], fusion: FusionResult) -> Callable[..., Any]:
    """Append, per call, the prepared fused weight of the weights actually passed."""
    groups = [(g.weight_inputs, g.transposed) for g in fusion.groups]
    if not groups:
        return compiled

    def run(*args: Any) -> Any:
        return compiled(*args, *(fused_weight([args[i] for i in idx], tr) for idx, tr in groups))

    return run
