"""FX pass branch for stacked 3-D expert weights: grouped mm / bmm become sparse expert ops.

Matches (``call_function`` nodes of the Dynamo graph):
- a grouped mm (``torch._grouped_mm``, or a library's ``grouped_mm`` custom op such as the fp32
  fallback) of expert-sorted rows ``x [S, in]`` with a weight operand ``[E, in, out]`` that is a
  graph input ``[E, ...]`` reached through permuting views that keep the expert dim first;
- ``torch.bmm`` of ``W[expert_ids]`` (``getitem`` of such a weight by a 1-D index) with the
  activation, the gathered weight first (``[S, out, in] @ x[S, in, 1]``) or second
  (``x[S, 1, in] @ [S, in, out]``).

Emits ``wisparse::sparse_grouped_mm(x, w, offs, thresholds, native)`` (native: the original was
``torch._grouped_mm``, which the op then calls; otherwise it loops over groups as the fallback
did) or ``wisparse::sparse_bmm(a, b, thresholds, expert_ids, weight_arg)``, where ``thresholds``
is the weight's [E, in] threshold input. Anything else about the call (bias adds, routing) stays.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import operator

import torch
from torch import fx

from ..attach import site_of
from ..config import BackendConfig
from ..linear_forms import BMM_WEIGHT_FIRST, BMM_WEIGHT_SECOND, GROUPED_MM, is_grouped_mm, offs_operand
from .sparse_linear import DENSE, SPARSE, LinearDecision, _example_value, replace_node, weight_root

log = logging.getLogger(__name__)

ThresholdInput = Callable[[int, torch.Tensor], fx.Node]


@dataclass(frozen=True)
class ExpertContraction:
    """A matched expert contraction: which operand is the activation, which the weight, and how rows
    are routed (``offs`` for grouped mm, ``expert_ids`` for bmm)."""

    form: str
    x: fx.Node
    weight: fx.Node  # the [E, ...] placeholder
    in_dim: int  # the placeholder's input-channel dim
    routing: fx.Node
    weight_arg: int  # position of the weight operand in the call
    native: bool = False


def _gathered_weight(node: Any) -> tuple[fx.Node, tuple[int, ...], fx.Node] | None:
    """(placeholder, root dims, expert_ids) for ``W[expert_ids]`` with W a graph input (through views)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    source, index = node.args
    index_val = _example_value(index)
    if not (isinstance(index_val, torch.Tensor) and index_val.dim() == 1 and not index_val.is_floating_point()):
        return None
    root = weight_root(source)
    if root is None or len(root[1]) != 3 or root[1][0] != 0:
        return None
    return root[0], root[1], index


def match_expert_contraction(node: fx.Node) -> ExpertContraction | None:
    """The expert contraction ``node`` performs (see the module docstring), or None."""
    if node.op != "call_function":
        return None
    if is_grouped_mm(node.target) and len(node.args) >= 2:
        if any(node.kwargs.get(k) is not None for k in ("bias", "out_dtype", "scale_a", "scale_b")):
            return None
        offs = offs_operand(node.args, node.kwargs)
        root = weight_root(node.args[1])
        if root is None or len(root[1]) != 3 or root[1][0] != 0 or not isinstance(offs, fx.Node):
            return None
        native = node.target is getattr(torch, "_grouped_mm", None) or node.target is getattr(
            torch.nn.functional, "grouped_mm", None)
        return ExpertContraction(GROUPED_MM.name, node.args[0], root[0], root[1][GROUPED_MM.weight_in_dim],
                                 offs, 1, native)
    if node.target in (torch.bmm, torch.ops.aten.bmm.default) and len(node.args) == 2 and not node.kwargs:
        for form in (BMM_WEIGHT_FIRST, BMM_WEIGHT_SECOND):
            gathered = _gathered_weight(node.args[form.weight_arg])
            if gathered is not None:
                weight, dims, expert_ids = gathered
                return ExpertContraction(form.name, node.args[form.x_arg], weight, dims[form.weight_in_dim],
                                         expert_ids, form.weight_arg)
    return None


def rewrite_expert_contraction(
    graph: fx.Graph, node: fx.Node, match: ExpertContraction, example_inputs: Sequence[Any],
    index_of: dict[fx.Node, int], config: BackendConfig, threshold_input: ThresholdInput,
) -> LinearDecision:
    """Replace one matched expert contraction by its sparse op, or say why it stays dense."""
    weight = example_inputs[index_of[match.weight]] if match.weight in index_of else None
    x_val = _example_value(match.x)
    decision = LinearDecision(
        node=node.name, form=match.form + (" (native)" if match.native else ""), name=None,
        weight_shape=tuple(weight.shape) if isinstance(weight, torch.Tensor) else None,
        dtype=str(x_val.dtype).removeprefix("torch.") if isinstance(x_val, torch.Tensor) else None,
        decision=DENSE, weight_input=index_of.get(match.weight),
    )
    site = site_of(weight)
    if site is None:
        decision.reason = "no plan entry"
        return decision
    decision.name = site.name
    if match.in_dim != site.in_dim:
        decision.reason = f"weight used with input channels on dim {match.in_dim}, planned on dim {site.in_dim}"
    elif not isinstance(x_val, torch.Tensor) or not x_val.is_floating_point():
        decision.reason = f"unsupported input dtype {decision.dtype}"
    elif x_val.dtype != weight.dtype:
        decision.reason = f"input dtype {decision.dtype} differs from weight dtype"
    elif not config.mask_prefill and not torch.fx.experimental.symbolic_shapes.statically_known_true(
        x_val.shape[0] <= config.max_sparse_rows
    ):
        decision.reason = "prefill left dense (mask_prefill=False)"
    if decision.reason:
        return decision
    t_node = threshold_input(index_of[match.weight], weight)
    with graph.inserting_before(node):
        if match.form == GROUPED_MM.name:
            new = graph.call_function(
                torch.ops.wisparse.sparse_grouped_mm.default, (match.x, node.args[1], match.routing, t_node, match.native)
            )
        else:
            new = graph.call_function(
                torch.ops.wisparse.sparse_bmm.default, (*node.args, t_node, match.routing, match.weight_arg)
            )
    replace_node(node, new)
    decision.node = new.name
    decision.decision = SPARSE
    log.debug("sparse experts: %s (%s %s) via %s", site.name, decision.weight_shape, decision.dtype, new.name)
    return decision
