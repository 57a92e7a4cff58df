"""The debug view of a compile report (``debug/report.py``): names for every linear, and the table."""

from types import SimpleNamespace

import torch
from torch import fx

from wisparse_compile.debug.report import dotted_source_name, format_table, name_decisions, placeholder_source
from wisparse_compile.kernels import Layout, Route
from wisparse_compile.passes.decisions import CompileReport, DenseReason, LinearDecision, Outcome


def test_dotted_source_names():
    src = "L['self']._modules['model']._modules['layers']._modules['0']._modules['mlp']._parameters['weight']"
    assert dotted_source_name(src) == "model.layers.0.mlp.weight"
    assert dotted_source_name("L['self'].model.layers[3].proj.weight") == "model.layers.3.proj.weight"
    # a forward wrapped as forward(*args) (transformers 5.2x): the module is the first positional
    assert dotted_source_name("L['args'][0]._modules['lm_head']._parameters['weight']") == "lm_head.weight"


def _graph_with_sources() -> fx.GraphModule:
    """x, the head's weight (a Dynamo source while compiling), an expert weight (a source on the node) and a linear."""
    graph = fx.Graph()
    x, head, experts = graph.placeholder("x"), graph.placeholder("w"), graph.placeholder("e")
    head.meta["grapharg"] = SimpleNamespace(source=SimpleNamespace(name=lambda: "L['self']._modules['lm_head']._parameters['weight']"))
    experts._dynamo_source = SimpleNamespace(name="L['self']._modules['moe']._parameters['down_proj']")
    linear = graph.call_function(torch.nn.functional.linear, (x, head))
    linear.meta["nn_module_stack"] = {"a": ("L['self'].model", object), "b": ("L['self'].model.layers[0].mlp", object)}
    graph.output(linear)
    return fx.GraphModule(torch.nn.Module(), graph)


def test_placeholder_source_reads_grapharg_then_the_node():
    gm = _graph_with_sources()
    x, head, experts = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholder_source(head) == "L['self']._modules['lm_head']._parameters['weight']"
    assert placeholder_source(experts) == "L['self']._modules['moe']._parameters['down_proj']"
    assert placeholder_source(x) is None


def _decision(node, name=None, weight_input=None, **fields) -> LinearDecision:
    return LinearDecision(node=node, form="linear", name=name, weight_shape=(8, 4), dtype="float32",
                          weight_input=weight_input, **fields)


def test_decisions_are_named_by_plan_key_then_weight_source_then_module_path():
    report = CompileReport([
        _decision("linear", name="model.layers.0.mlp.up_proj"),  # planned: its plan key
        _decision("linear", weight_input=1),  # the weight's source, as a plan key
        _decision("linear", weight_input=2),
        _decision("linear", weight_input=7),  # no such input: the node's module path
        _decision("gone", weight_input=None),  # nothing known: the node's name
    ])
    assert name_decisions(report, "0_1", _graph_with_sources()) is report and report.graph == "0_1"
    assert [d.module for d in report.decisions] == [
        "model.layers.0.mlp.up_proj", "lm_head", "moe.down_proj", "model.layers.0.mlp", "gone"]


def test_table_shows_each_decision_and_the_counts():
    sparse = _decision("a", name="q", module="q", decision=Outcome.SPARSE, route=Route.CPU_KERNEL,
                       layout=Layout.INT8, planned_sparsity=0.5)
    fused = _decision("b", name="k", module="k", decision=Outcome.FUSED, route=Route.TRITON, planned_sparsity=0.25)
    dense = _decision("c", module="lm_head").leave_dense(DenseReason.NO_PLAN)
    prefill = _decision("d", module="v").leave_dense(DenseReason.PREFILL, "12 rows > max_sparse_rows 8")
    report = CompileReport([sparse, fused, dense, prefill], graph="0_0")
    lines = format_table(report).splitlines()
    assert lines[0] == "graph 0_0" and lines[1].split() == ["module", "shape", "dtype", "planned", "became", "route", "why", "dense"]
    assert set(lines[2]) == {"-", " "}
    assert lines[3].split() == ["q", "8x4", "float32", "0.50", "sparse_linear", "int8", "cpu_kernel"]
    assert lines[4].split() == ["k", "8x4", "float32", "0.25", "fused", "triton"]
    assert lines[5].split() == ["lm_head", "8x4", "float32", "-", "dense", "no", "plan", "entry"]
    assert lines[6].endswith("prefill size: 12 rows > max_sparse_rows 8")
    assert lines[7] == "4 linears found: 2 rewritten, 1 fused, 2 left dense (fused ones count as rewritten)"
    assert "\033[" not in "\n".join(lines)
    coloured = format_table(report, colour=True).splitlines()
    assert [line[:5] for line in coloured[3:7]] == ["\033[32m", "\033[36m", "\033[33m", "\033[33m"]
    assert all(line.endswith("\033[0m") for line in coloured[3:7])


def test_an_empty_report_is_a_header_and_zero_counts():
    assert format_table(CompileReport(graph="3")).splitlines()[-1] == "0 linears found: 0 rewritten, 0 fused, 0 left dense"
