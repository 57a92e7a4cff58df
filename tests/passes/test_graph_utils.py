"""The FX machinery the passes share (``passes/graph_utils.py``), on small hand-built graphs."""

import operator

import torch
from torch import fx, nn

from wisparse_compile.passes.graph_utils import (
    SOURCE_META,
    GraphInputs,
    copy_dynamo_graph_module,
    example_value,
    local_operand,
    nodes_under_autocast,
    replace_node,
    weight_root,
)

W_OUT_IN = torch.randn(6, 4)  # [out, in]


def test_fx_weight_root_follows_permuting_views():
    graph = fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    w.meta["example_value"] = W_OUT_IN.detach()
    t = graph.call_function(getattr, (w, "T"))
    t.meta["example_value"] = W_OUT_IN.detach().T
    tt = graph.call_method("transpose", (t, 0, 1))
    tt.meta["example_value"] = W_OUT_IN.detach()
    mm = graph.call_function(operator.matmul, (x, t))
    viewed = graph.call_method("view", (w, 24))
    graph.output((mm, tt, viewed))
    assert weight_root(t) == (w, (1, 0))  # matmul contracts dim 0 of the view = input dim 1
    assert weight_root(tt) == (w, (0, 1))
    assert weight_root(viewed) is None  # a reshape is no permutation: not followed


def test_weight_root_follows_a_local_shard():
    """``w.to_local().t()``: a tensor-parallel weight's shard has the weight's dims."""
    graph = fx.Graph()
    w = graph.placeholder("w")
    w.meta["example_value"] = W_OUT_IN
    local = graph.call_method("to_local", (w,))
    local.meta["example_value"] = W_OUT_IN
    t = graph.call_method("t", (local,))
    assert weight_root(t) == (w, (1, 0)) and weight_root(local) == (w, (0, 1))
    assert weight_root("not a node") is None


def test_example_value_reads_dynamos_then_aots_meta():
    graph = fx.Graph()
    a, b, c = graph.placeholder("a"), graph.placeholder("b"), graph.placeholder("c")
    a.meta["example_value"], b.meta["val"] = W_OUT_IN, W_OUT_IN.T
    assert example_value(a) is W_OUT_IN and example_value(b) is not None and example_value(b).shape == (4, 6)
    assert example_value(c) is None and example_value(3) is None


def _autocast_graph():
    """relu nodes: one under an enabled autocast, one under a disabled one nested in it, one after."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    outer = graph.call_function(torch.amp._enter_autocast, ("cpu", torch.bfloat16, True, None))
    under = graph.call_function(torch.relu, (x,))
    inner = graph.call_function(torch.amp._enter_autocast, ("cpu", None, False, None))
    disabled = graph.call_function(torch.relu, (under,))
    graph.call_function(torch.amp._exit_autocast, (inner,))
    under_again = graph.call_function(torch.relu, (disabled,))
    graph.call_function(torch.amp._exit_autocast, (outer,))
    after = graph.call_function(torch.relu, (under_again,))
    graph.output(after)
    return graph, {under, under_again}


def test_nodes_under_autocast_follow_the_enter_and_exit_nodes():
    graph, expected = _autocast_graph()
    assert nodes_under_autocast(graph) == expected


def test_every_node_is_under_autocast_when_compiled_inside_the_callers():
    graph, _ = _autocast_graph()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert nodes_under_autocast(graph) == set(graph.nodes)


def test_graph_inputs_append_a_static_input_after_the_last():
    graph = fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    y = graph.call_function(torch.nn.functional.linear, (x, w))
    graph.output(y)
    examples = [torch.randn(1, 4), W_OUT_IN]
    inputs = GraphInputs(graph, examples)
    assert inputs.example(w) is W_OUT_IN and inputs.example(y) is None and inputs.example(None) is None
    thresholds = torch.zeros(4)
    node = inputs.append_static("thresholds", thresholds)
    assert [n.name for n in graph.nodes if n.op == "placeholder"] == ["x", "w", "thresholds"]
    assert inputs.placeholders[-1] is node and inputs.index_of[node] == 2 and node._dynamo_source is None
    assert node.meta["example_value"] is thresholds
    assert node.meta["tensor_dict"] == {"_dynamo_static_input_type": "unguarded"}
    assert inputs.example(node) is None  # appended inputs have no example among Dynamo's


def test_copy_keeps_dynamo_metadata_and_leaves_the_original_alone():
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 2), nn.ReLU()))
    (x,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    x._dynamo_source = "L['x']"
    gm.meta["dynamo_flat_name_to_original_fqn"] = {"w": "0.weight"}
    gm.extra_attribute = "kept"
    copy = copy_dynamo_graph_module(gm)
    (copied_x,) = [n for n in copy.graph.nodes if n.op == "placeholder"]
    assert copy.graph is not gm.graph and copied_x._dynamo_source == "L['x']"
    assert copy.meta == gm.meta and copy.extra_attribute == "kept"
    inp = torch.randn(3, 4)
    torch.testing.assert_close(copy(inp), gm(inp))
    relu = next(n for n in copy.graph.nodes if n.op == "call_module" and n.target == "1")
    relu.replace_all_uses_with(relu.args[0])
    copy.graph.erase_node(relu)
    copy.recompile()
    assert len(copy.graph.nodes) == len(gm.graph.nodes) - 1
    assert (gm(-inp.abs() * 100) >= 0).all()  # the original still ends in its relu


def test_replace_node_moves_uses_value_meta_and_source_location():
    graph = fx.Graph()
    x = graph.placeholder("x")
    old = graph.call_function(torch.relu, (x,))
    for key in (*SOURCE_META, "example_value", "val", "other"):
        old.meta[key] = key
    user = graph.call_function(operator.neg, (old,))
    graph.output(user)
    with graph.inserting_before(old):
        new = graph.call_function(torch.sigmoid, (x,))
    replace_node(old, new)
    assert user.args == (new,) and old not in graph.nodes
    assert new.meta == {key: key for key in (*SOURCE_META, "example_value", "val")}


def test_local_operand_of_a_plain_tensor_is_the_node_itself():
    graph = fx.Graph()
    w = graph.placeholder("w")
    w.meta["example_value"] = W_OUT_IN
    assert local_operand(graph, w) is w and len(graph.nodes) == 1
