"""The sparsify pass over a Dynamo graph: planned linears become wisparse sparse ops.

Matches every contraction that ``rewrite_experts`` (stacked 3-D expert weights) or
``rewrite_linears`` (``linear``, ``addmm``, ``matmul``) recognises, and asks ``eligibility``
whether it may run sparse. A node is tied to its plan entry by the weight *object* passed as its
graph input (the plan slot ``attach`` put on it, ``planned.py``): exact, no names needed, and it survives graph breaks
(sources relative to a frame) and tied weights.

Emits the form's sparse op in place of each eligible node, fed by a new thresholds input appended
after the graph's inputs (one per distinct weight). The backend feeds it at run time with the
thresholds of the weight actually passed, so one compiled graph serves any model instance with any
plan. Every other linear is left as it was, with its ``DenseReason`` recorded.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, Sequence

import torch
from torch import fx

from ..planned import planned_sparsity, thresholds_of
from ..config import BackendConfig
from ..kernels import Layout, Route
from .decisions import DenseReason, LinearDecision, Outcome, RewriteResult
from .eligibility import check_eligibility
from .graph_utils import GraphInputs, example_value, nodes_under_autocast, replace_node
from .rewrite_experts import is_unmatched_expert_contraction, match_expert_contraction
from .rewrite_linears import match_linear

log = logging.getLogger(__name__)


class Contraction(Protocol):
    """What a matcher returns (``LinearMatch``, ``ExpertMatch``)."""

    x: Any
    weight: fx.Node | None
    in_dim: int
    problem: tuple[DenseReason, str] | None

    @property
    def label(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...] | None: ...
    @property
    def rows(self) -> Any: ...
    @property
    def layout(self) -> Layout: ...
    def route(self, config: BackendConfig) -> Route: ...
    def emit(self, graph: fx.Graph, node: fx.Node, thresholds: fx.Node, config: BackendConfig) -> fx.Node: ...


def _decide(node: fx.Node, match: Contraction, inputs: GraphInputs, under_autocast: bool, config: BackendConfig) -> LinearDecision:
    """The decision for one matched node: sparse (with its route) or dense, and why."""
    x, weight = example_value(match.x), inputs.example(match.weight)
    typed = weight if isinstance(weight, torch.Tensor) else x
    decision = LinearDecision(
        node=node.name, form=match.label, name=None,
        weight_shape=tuple(weight.shape) if isinstance(weight, torch.Tensor) else match.shape,
        dtype=str(typed.dtype).removeprefix("torch.") if isinstance(typed, torch.Tensor) else None,
        weight_input=inputs.index_of.get(match.weight) if match.weight is not None else None,
        planned_sparsity=planned_sparsity(weight),
    )
    if match.weight is None and match.problem is not None:
        return decision.leave_dense(*match.problem)
    verdict = check_eligibility(weight, match.in_dim, x, match.rows, under_autocast, config)
    decision.name = verdict.plan_name
    if not verdict.ok:
        return decision.leave_dense(verdict.reason_kind, verdict.reason)
    if match.problem is not None:
        return decision.leave_dense(*match.problem)
    decision.decision, decision.route, decision.layout = Outcome.SPARSE, match.route(config), match.layout
    return decision


def rewrite_sparse_linears(
    gm: fx.GraphModule, example_inputs: Sequence[Any], config: BackendConfig | None = None
) -> RewriteResult:
    """Rewrite the eligible linears of ``gm`` in place; see the module docstring."""
    config = config or BackendConfig()
    graph = gm.graph
    inputs = GraphInputs(graph, example_inputs)
    under_autocast = nodes_under_autocast(graph)
    result = RewriteResult()
    decisions = result.report.decisions
    threshold_nodes: dict[int, fx.Node] = {}

    def thresholds_input(w_index: int, weight: torch.Tensor) -> fx.Node:
        """The appended input that carries ``weight``'s thresholds (one per distinct weight)."""
        if w_index not in threshold_nodes:
            example = thresholds_of(weight)
            threshold_nodes[w_index] = inputs.append_static(f"wisparse_thresholds_{len(threshold_nodes)}", example)
            result.threshold_sources.append(w_index)
            result.threshold_examples.append(example)
        return threshold_nodes[w_index]

    for node in list(graph.nodes):
        match = match_expert_contraction(node, inputs) or match_linear(node, inputs)
        if match is None:
            continue
        decision = _decide(node, match, inputs, node in under_autocast, config)
        decisions.append(decision)
        if decision.reason_kind is DenseReason.NO_PLAN and decision.weight_input is not None:
            result.unplanned_weight_inputs.append(decision.weight_input)
        if decision.decision != Outcome.SPARSE:
            layout = match.layout
            if decision.reason_kind is DenseReason.NO_PLAN and layout is not Layout.FLOAT and node not in under_autocast:
                replace_node(node, new := match.emit(graph, node, None, config))  # quantized storage, no plan: dense quantized op
                decision.node, decision.route, decision.layout = new.name, match.route(config), layout
                decision.reason = f"{decision.reason}; {layout.value} weight: dense {layout.value} op"
            continue
        new = match.emit(graph, node, thresholds_input(decision.weight_input, inputs.example(match.weight)), config)
        replace_node(node, new)
        decision.node = new.name
        log.debug("sparse: %s (%s %s) via %s", decision.name, decision.weight_shape, decision.dtype, new.name)

    for node in graph.nodes:
        if is_unmatched_expert_contraction(node, inputs):
            decisions.append(LinearDecision(node.name, str(node.target), None, None, None).leave_dense(
                DenseReason.UNMATCHED_EXPERT_FORM, "stacked expert weights in a form the pass does not match"))
    for d in decisions:
        if d.decision == Outcome.DENSE:
            log.debug("dense: %s %s: %s", d.node, d.name or "", d.reason)
    if result.report.rewritten or any(d.route is not Route.DENSE for d in decisions):
        graph.lint()
        gm.recompile()
    return result
