"""The expert matchers and emitter (``passes/rewrite_experts.py``) on hand-built graphs of stacked
``[E, ...]`` weights: a grouped mm over the whole stack, and bmm over ``W[expert_ids]`` either way round."""

import operator

import pytest
import torch
from torch import fx, nn

import wisparse_compile.kernels  # noqa: F401  (registers torch.ops.wisparse.sparse_experts)
from wisparse_compile.config import BackendConfig
from wisparse_compile.kernels import Layout, Route
from wisparse_compile.passes.graph_utils import GraphInputs
from wisparse_compile.passes.rewrite_experts import (
    is_unmatched_expert_contraction,
    match_bmm,
    match_expert_contraction,
    match_grouped_mm,
)

E, OUT, IN, ROWS = 2, 6, 4, 3


def _input(graph: fx.Graph, name: str, value: torch.Tensor) -> fx.Node:
    node = graph.placeholder(name)
    node.meta["example_value"] = value
    return node


def _grouped_mm(view=("transpose", 1, 2), **kwargs):
    """``torch._grouped_mm(x [S, in], W.<view> , offs)`` with W [E, out, in] a parameter input."""
    graph = fx.Graph()
    x = _input(graph, "x", torch.randn(ROWS, IN))
    w = _input(graph, "w", nn.Parameter(torch.randn(E, OUT, IN)))
    offs = _input(graph, "offs", torch.tensor([1, 3], dtype=torch.int32))
    viewed = graph.call_method(view[0], (w, *view[1:]))
    viewed.meta["example_value"] = getattr(w.meta["example_value"], view[0])(*view[1:])
    node = graph.call_function(torch._grouped_mm, (x, viewed, offs), kwargs)
    graph.output(node)
    return graph, node, (x, w, offs)


def _bmm(weight_first: bool, index=torch.tensor([0, 1, 1])):
    """``bmm(W[ids], x [S, in, 1])`` (W [E, out, in]) or ``bmm(x [S, 1, in], W[ids])`` (W [E, in, out])."""
    graph = fx.Graph()
    shape, x_shape = ((E, OUT, IN), (ROWS, IN, 1)) if weight_first else ((E, IN, OUT), (ROWS, 1, IN))
    x = _input(graph, "x", torch.randn(x_shape))
    w = _input(graph, "w", nn.Parameter(torch.randn(shape)))
    ids = _input(graph, "ids", index)
    gathered = graph.call_function(operator.getitem, (w, ids))
    node = graph.call_function(torch.bmm, (gathered, x) if weight_first else (x, gathered))
    graph.output(node)
    return graph, node, (x, w, ids)


def test_grouped_mm_over_the_whole_stack_is_matched():
    graph, node, (x, w, offs) = _grouped_mm()
    match = match_grouped_mm(node)
    assert (match.form, match.x, match.weight, match.in_dim, match.routing, match.weight_arg) == ("grouped_mm", x, w, 2, offs, 1)
    assert match.native and match.label == "grouped_mm (native)" and match.rows == ROWS
    assert (match.shape, match.layout, match.route(BackendConfig())) == (None, Layout.FLOAT, Route.MASKED_DENSE)


@pytest.mark.parametrize("case", ["bias", "expert dim moved", "no offs"])
def test_grouped_mm_that_is_not_a_plain_expert_contraction_is_not_matched(case):
    if case == "bias":
        _, node, _ = _grouped_mm(bias=torch.zeros(OUT))
    elif case == "expert dim moved":
        _, node, _ = _grouped_mm(view=("permute", 1, 0, 2))
    else:
        graph, node, _ = _grouped_mm()
        node.args = (node.args[0], node.args[1])
    assert match_grouped_mm(node) is None


@pytest.mark.parametrize("weight_first, in_dim, x_arg", [(True, 2, 1), (False, 1, 0)])
def test_bmm_of_gathered_experts_is_matched_either_way_round(weight_first, in_dim, x_arg):
    graph, node, (x, w, ids) = _bmm(weight_first)
    match = match_bmm(node)
    assert (match.form, match.x, match.weight, match.in_dim, match.routing) == ("bmm", x, w, in_dim, ids)
    assert match.weight_arg == 1 - x_arg and not match.native and match.label == "bmm"
    inputs = GraphInputs(graph, [x.meta["example_value"], w.meta["example_value"], ids.meta["example_value"]])
    assert match_expert_contraction(node, inputs) == match
    assert match_expert_contraction(x, inputs) is None


def test_bmm_indexed_by_floats_or_of_activations_is_not_matched():
    _, node, _ = _bmm(True, index=torch.tensor([0.0, 1.0, 1.0]))
    assert match_bmm(node) is None
    graph = fx.Graph()
    a, b = _input(graph, "a", torch.randn(2, 3, 4)), _input(graph, "b", torch.randn(2, 4, 5))
    assert match_bmm(graph.call_function(torch.bmm, (a, b))) is None


def test_emit_inserts_the_sparse_expert_op_with_the_calls_routing():
    graph, node, (x, w, offs) = _grouped_mm()
    thresholds = graph.placeholder("thresholds")
    emitted = match_grouped_mm(node).emit(graph, node, thresholds, BackendConfig())
    assert emitted.target is torch.ops.wisparse.sparse_experts.default
    assert emitted.args == (x, node.args[1], thresholds, offs, "grouped_mm_native")
    assert list(graph.nodes).index(emitted) < list(graph.nodes).index(node)

    graph, node, (x, w, ids) = _bmm(weight_first=False)
    thresholds = graph.placeholder("thresholds")
    emitted = match_bmm(node).emit(graph, node, thresholds, BackendConfig())
    assert emitted.args == (*node.args, thresholds, ids, "bmm_weight_second")


def test_unmatched_expert_contractions_over_parameters_are_found():
    graph, node, inputs = _bmm(weight_first=True)
    graph_inputs = GraphInputs(graph, [n.meta["example_value"] for n in inputs])
    assert is_unmatched_expert_contraction(node, graph_inputs)  # still in the graph: no matcher took it
    activations = GraphInputs(graph, [torch.randn(1)] * 3)  # no parameter behind the operands
    assert not is_unmatched_expert_contraction(node, activations)
    relu = graph.call_function(torch.relu, (inputs[0],))
    assert not is_unmatched_expert_contraction(relu, graph_inputs)
    ours = graph.call_function(torch.ops.wisparse.sparse_experts.default, node.args)
    assert not is_unmatched_expert_contraction(ours, graph_inputs)
