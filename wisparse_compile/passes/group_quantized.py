"""The quantized-sibling pass: int8 (or int4) linears that read one input become one group call.

Matches: ``wisparse::sparse_linear_int8`` nodes (``wisparse::sparse_linear_int4`` likewise, each
format apart) emitted by ``rewrite_sparse_linears`` that read the same input (``same_input``: one
node, or shape-keeping views of it; q/k/v, gate/up) with the same ``max_sparse_rows``, whose
``qdata``/``scale`` operands are read off graph inputs and whose bias and thresholds are graph
inputs or None. Planned members (thresholds) and unplanned ones (None: a dense quantized op) group
alike. Groups of 2+ are cut into chunks of at most ``MAX_SEGMENTS``, in graph order.

Emits: ``g = wisparse.sparse_linear_int8_group(x, [q...], [s...], [b...], [t...], rows)`` (int4:
``sparse_linear_int4_group(x, [q...], [s...], [n...], [b...], [t...], rows)``) before the first
member, with the later members' ``getattr(W, "qdata"/"scale")`` nodes moved up to it; each member
becomes ``split(g, sizes, -1)[i]``. No graph input is added and no weight copied (the kernel reads
each member's own storage), which is why ``BackendConfig.group_quantized`` is on by default; what a
group saves is the dispatches and a better thread split (``kernels/quantized_group_op.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx

from ..kernels import MAX_SEGMENTS
from .decisions import LinearDecision, RewriteResult
from .fuse_siblings import erase_dead_views, mark_sibling, member_outputs, same_input
from .graph_utils import copy_source_meta, example_value

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Format:
    """Where a member op keeps its operands, and the group op it joins."""

    member: Callable[..., Any]
    group: Callable[..., Any]
    # positions in the member's args: weight parts (qdata, scale), per-weight constants, bias, thresholds, rows
    parts: tuple[int, ...]
    constants: tuple[int, ...]
    bias: int
    thresholds: int
    rows: int


def _formats() -> list[_Format]:
    ops = torch.ops.wisparse
    return [
        _Format(ops.sparse_linear_int8.default, ops.sparse_linear_int8_group.default, (1, 2), (), 3, 4, 5),
        _Format(ops.sparse_linear_int4.default, ops.sparse_linear_int4_group.default, (1, 2), (3,), 4, 5, 6),
    ]


def _is_input_part(node: Any) -> bool:
    """``getattr(placeholder, name)`` (a quantized weight's ``qdata``/``scale``) or a placeholder."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "placeholder":
        return True
    return node.op == "call_function" and node.target is getattr and node.args[0].op == "placeholder"


def _input_or_none(node: Any) -> bool:
    return node is None or (isinstance(node, fx.Node) and node.op == "placeholder")


def group_quantized_siblings(gm: fx.GraphModule, result: RewriteResult) -> int:
    """Group quantized sibling linears of ``gm`` in place (see the module docstring); returns the group count."""
    graph = gm.graph
    decisions = {d.node: d for d in result.report.decisions}
    groups = 0
    for fmt in _formats():
        by_input: dict[tuple[Any, Any], list[fx.Node]] = {}
        for node in graph.nodes:
            if node.op != "call_function" or node.target is not fmt.member:
                continue
            args = node.args
            if not all(_is_input_part(args[i]) for i in fmt.parts):
                continue
            if not (_input_or_none(args[fmt.bias]) and _input_or_none(args[fmt.thresholds])):
                continue
            by_input.setdefault((same_input(args[0]), args[fmt.rows]), []).append(node)
        for (x, rows), members in by_input.items():
            for start in range(0, len(members), MAX_SEGMENTS):
                chunk = members[start : start + MAX_SEGMENTS]
                if len(chunk) >= 2:
                    _group(graph, fmt, chunk, x, rows, decisions)
                    groups += 1
    if groups:
        graph.lint()
        gm.recompile()
        log.info("wisparse: grouped %d sets of quantized sibling linears", groups)
    return groups


def _group(
    graph: fx.Graph, fmt: _Format, chunk: list[fx.Node], x: fx.Node, rows: Any, decisions: dict[str, LinearDecision]
) -> None:
    """One group call before ``chunk[0]`` in place of the members of ``chunk``."""
    first = chunk[0]
    for member in chunk[1:]:
        for i in fmt.parts:
            part = member.args[i]
            if part.op != "placeholder":
                first.prepend(part)  # its only input is a placeholder: valid anywhere
    sizes = [example_value(m).shape[-1] for m in chunk]
    lists = [[m.args[i] for m in chunk] for i in fmt.parts]
    constants = [[m.args[i] for m in chunk] for i in fmt.constants]
    with graph.inserting_before(first):
        group = graph.call_function(
            fmt.group,
            (x, *lists, *constants, [m.args[fmt.bias] for m in chunk], [m.args[fmt.thresholds] for m in chunk], rows),
        )
        copy_source_meta(first, group, ("stack_trace", "nn_module_stack"))
        outs = member_outputs(graph, group, chunk, sizes)
    for member, out in zip(chunk, outs):
        member_x = member.args[0]
        member.replace_all_uses_with(out)
        mark_sibling(decisions.get(member.name), group.name, len(chunk))
        graph.erase_node(member)
        erase_dead_views(member_x, x)
