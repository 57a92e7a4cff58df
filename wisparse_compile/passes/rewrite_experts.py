"""Match contractions of stacked 3-D expert weights and emit the sparse expert ops for them.

Matches (``call_function`` nodes of the Dynamo graph):
- a grouped mm (``torch._grouped_mm``, or a library's ``grouped_mm`` custom op such as the fp32
  fallback) of expert-sorted rows ``x [S, in]`` with a weight operand ``[E, in, out]`` that is a
  graph input ``[E, ...]`` reached through permuting views that keep the expert dim first;
- ``torch.bmm`` of ``W[expert_ids]`` (``getitem`` of such a weight by a 1-D index) with the
  activation, the gathered weight first (``[S, out, in] @ x[S, in, 1]``) or second
  (``x[S, 1, in] @ [S, in, out]``).

Emits ``wisparse::sparse_experts(x, w, thresholds, offs, form)`` for a grouped mm (form
``grouped_mm_native`` where the original was ``torch._grouped_mm``, which the op then calls;
otherwise it loops over groups as the fallback did) or ``sparse_experts(a, b, thresholds,
expert_ids, form)`` for a bmm (form ``bmm_weight_first``/``bmm_weight_second``: which operand is the
gathered weight), where ``thresholds`` is the weight's [E, in] threshold input. Anything else about
the call (bias adds, routing) stays. The op masks, then contracts densely (``Route.MASKED_DENSE``). ``is_unmatched_expert_contraction``
finds the bmm / grouped mm nodes over parameters that no matcher took, so the report lists them.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from ..config import BackendConfig
from ..linear_forms import BMM_WEIGHT_FIRST, BMM_WEIGHT_SECOND, GROUPED_MM, is_grouped_mm, offs_operand
from ..kernels import Layout, Route
from .decisions import DenseReason
from .graph_utils import GraphInputs, example_value, weight_root


@dataclass(frozen=True)
class ExpertMatch:
    """A matched expert contraction: which operand is the activation, which the weight, and how rows
    are routed (``offs`` for grouped mm, ``expert_ids`` for bmm)."""

    form: str
    x: fx.Node
    weight: fx.Node  # the [E, ...] placeholder
    in_dim: int  # the placeholder's input-channel dim
    routing: fx.Node
    weight_arg: int  # position of the weight operand in the call
    native: bool = False
    problem: tuple[DenseReason, str] | None = None  # no expert form has one yet

    @property
    def label(self) -> str:
        return self.form + (" (native)" if self.native else "")

    @property
    def shape(self) -> tuple[int, ...] | None:
        return None  # the weight is always a graph input: reports take the parameter's shape

    @property
    def rows(self) -> Any:
        x = example_value(self.x)
        return x.shape[0] if isinstance(x, torch.Tensor) and x.dim() > 0 else 0

    @property
    def layout(self) -> Layout:
        return Layout.FLOAT  # stacked expert weights are never quantized

    def route(self, config: BackendConfig) -> Route:
        return Route.MASKED_DENSE

    def emit(self, graph: fx.Graph, node: fx.Node, thresholds: fx.Node, config: BackendConfig) -> fx.Node:
        """The sparse expert op before ``node`` (the caller replaces ``node`` by it)."""
        with graph.inserting_before(node):
            if self.form == GROUPED_MM.name:
                form = "grouped_mm_native" if self.native else "grouped_mm"
                return graph.call_function(
                    torch.ops.wisparse.sparse_experts.default, (self.x, node.args[1], thresholds, self.routing, form)
                )
            form = "bmm_weight_first" if self.weight_arg == 0 else "bmm_weight_second"
            return graph.call_function(torch.ops.wisparse.sparse_experts.default, (*node.args, thresholds, self.routing, form))


def _gathered_weight(node: Any) -> tuple[fx.Node, tuple[int, ...], fx.Node] | None:
    """(placeholder, root dims, expert_ids) for ``W[expert_ids]`` with W a graph input (through views)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    source, index = node.args
    index_val = example_value(index)
    if not (isinstance(index_val, torch.Tensor) and index_val.dim() == 1 and not index_val.is_floating_point()):
        return None
    root = weight_root(source)
    if root is None or len(root[1]) != 3 or root[1][0] != 0:
        return None
    return root[0], root[1], index


def match_grouped_mm(node: fx.Node) -> ExpertMatch | None:
    """A grouped mm of expert-sorted rows with a whole stacked weight (no bias, scales or out dtype)."""
    if not (is_grouped_mm(node.target) and len(node.args) >= 2):
        return None
    if any(node.kwargs.get(k) is not None for k in ("bias", "out_dtype", "scale_a", "scale_b")):
        return None
    offs = offs_operand(node.args, node.kwargs)
    root = weight_root(node.args[1])
    if root is None or len(root[1]) != 3 or root[1][0] != 0 or not isinstance(offs, fx.Node):
        return None
    native = node.target is getattr(torch, "_grouped_mm", None) or node.target is getattr(
        torch.nn.functional, "grouped_mm", None)
    return ExpertMatch(GROUPED_MM.name, node.args[0], root[0], root[1][GROUPED_MM.weight_in_dim], offs, 1, native)


def match_bmm(node: fx.Node) -> ExpertMatch | None:
    """``bmm`` of the activation with a gathered ``W[expert_ids]``, either operand order."""
    if not (node.target in (torch.bmm, torch.ops.aten.bmm.default) and len(node.args) == 2 and not node.kwargs):
        return None
    for form in (BMM_WEIGHT_FIRST, BMM_WEIGHT_SECOND):
        gathered = _gathered_weight(node.args[form.weight_arg])
        if gathered is not None:
            weight, dims, expert_ids = gathered
            return ExpertMatch(form.name, node.args[form.x_arg], weight, dims[form.weight_in_dim], expert_ids,
                               form.weight_arg)
    return None


def match_expert_contraction(node: fx.Node, inputs: GraphInputs) -> ExpertMatch | None:
    """The expert contraction ``node`` performs on a stacked weight input, or None."""
    if node.op != "call_function":
        return None
    match = match_grouped_mm(node) or match_bmm(node)
    return match if match is not None and match.weight in inputs.index_of else None


def _parameter_behind(node: Any, inputs: GraphInputs) -> Any:
    """The parameter behind an operand reached through views and indexing (W[expert_ids]), or None."""
    for _ in range(4):
        if not isinstance(node, fx.Node):
            return None
        if node.op == "placeholder":
            value = inputs.example(node)
            return value if isinstance(value, torch.nn.Parameter) else None
        if not node.args:
            return None
        node = node.args[0]
    return None


def is_unmatched_expert_contraction(node: fx.Node, inputs: GraphInputs) -> bool:
    """A bmm / grouped mm over a parameter that is still in the graph (no matcher took it)."""
    if node.op != "call_function" or str(node.target).startswith("wisparse."):
        return False
    if not (node.target in (torch.bmm, torch.baddbmm) or "grouped_mm" in str(node.target)):
        return False
    return any(_parameter_behind(a, inputs) is not None for a in node.args[:2])
