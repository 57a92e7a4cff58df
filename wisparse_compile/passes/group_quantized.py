"""The quantized-sibling pass: int8 (or int4) linears that read one input become one group call.

Matches: ``wisparse::sparse_linear`` nodes of int8 or int4 weights (each layout apart) emitted by
``rewrite_sparse_linears`` that read the same input (``same_input``: one node, or shape-keeping
views of it; q/k/v, gate/up) with the same ``max_sparse_rows``, whose ``qdata``/``scale`` operands
are read off graph inputs and whose bias and thresholds are graph inputs or None. Planned members
(thresholds) and unplanned ones (None: a dense quantized op) group alike. Groups of 2+ are cut into
chunks of at most ``MAX_SEGMENTS``, in graph order.

Emits: ``g = wisparse.sparse_linear_group(x, [q...], [b...], [t...], rows, layout, [s...], [n...])``
before the first member, with the later members' ``getattr(W, "qdata"/"scale")`` nodes moved up to
it; each member becomes ``split(g, sizes, -1)[i]``. No graph input is added and no weight copied
(the kernel reads each member's own storage), which is why ``BackendConfig.group_quantized`` is on
by default; what a group saves is the dispatches and a better thread split (``kernels/group_op.py``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx

from ..kernels import MAX_SEGMENTS, Layout
from .decisions import LinearDecision, RewriteResult
from .fuse_siblings import SparseLinearCall, erase_dead_views, mark_sibling, member_outputs, same_input, sparse_linear_call
from .graph_utils import copy_source_meta, example_value

log = logging.getLogger(__name__)


def _is_input_part(node: Any) -> bool:
    """``getattr(placeholder, name)`` (a quantized weight's ``qdata``/``scale``) or a placeholder."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "placeholder":
        return True
    return node.op == "call_function" and node.target is getattr and node.args[0].op == "placeholder"


def _input_or_none(node: Any) -> bool:
    return node is None or (isinstance(node, fx.Node) and node.op == "placeholder")


def _groupable(call: SparseLinearCall | None) -> bool:
    return (
        call is not None and call.layout is not Layout.FLOAT
        and _is_input_part(call.weight) and _is_input_part(call.scale)
        and _input_or_none(call.bias) and _input_or_none(call.thresholds)
    )


def group_quantized_siblings(gm: fx.GraphModule, result: RewriteResult) -> int:
    """Group quantized sibling linears of ``gm`` in place (see the module docstring); returns the group count."""
    graph = gm.graph
    decisions = {d.node: d for d in result.report.decisions}
    by_input: dict[tuple[Layout, Any, Any], list[tuple[fx.Node, SparseLinearCall]]] = {}
    for node in graph.nodes:
        call = sparse_linear_call(node)
        if _groupable(call):
            by_input.setdefault((call.layout, same_input(call.x), call.rows), []).append((node, call))
    groups = 0
    for (layout, x, rows), members in by_input.items():
        for start in range(0, len(members), MAX_SEGMENTS):
            chunk = members[start : start + MAX_SEGMENTS]
            if len(chunk) >= 2:
                _group(graph, layout, chunk, x, rows, decisions)
                groups += 1
    if groups:
        graph.lint()
        gm.recompile()
        log.info("wisparse: grouped %d sets of quantized sibling linears", groups)
    return groups


def _group(
    graph: fx.Graph, layout: Layout, chunk: list[tuple[fx.Node, SparseLinearCall]], x: fx.Node, rows: Any,
    decisions: dict[str, LinearDecision],
) -> None:
    """One group call before the first member of ``chunk`` in place of its members."""
    first = chunk[0][0]
    for _, call in chunk[1:]:
        for part in (call.weight, call.scale):
            if part.op != "placeholder":
                first.prepend(part)  # its only input is a placeholder: valid anywhere
    sizes = [example_value(node).shape[-1] for node, _ in chunk]
    calls = [call for _, call in chunk]
    with graph.inserting_before(first):
        group = graph.call_function(
            torch.ops.wisparse.sparse_linear_group.default,
            (x, [c.weight for c in calls], [c.bias for c in calls], [c.thresholds for c in calls], rows, layout.value,
             [c.scale for c in calls], sizes),
        )
        copy_source_meta(first, group, ("stack_trace", "nn_module_stack"))
        outs = member_outputs(graph, group, [node for node, _ in chunk], sizes)
    for (member, call), out in zip(chunk, outs):
        member.replace_all_uses_with(out)
        mark_sibling(decisions.get(member.name), group.name, len(chunk))
        graph.erase_node(member)
        erase_dead_views(call.x, x)
