"""The sparsify pass (``passes/sparsify.py``): planned linears become ``sparse_linear`` fed by one appended
thresholds input per weight, unplanned ones stay and say why, and an unplanned quantized weight runs the
dense quantized op, its layout recorded; new nodes keep the model's source location, and each linear's
route is the one its op lowers to."""

import pytest
import torch
from torch import nn

import wisparse_compile as wsc
from tests.debug.models import planned_net
from tests.passes.conftest import dynamo_graph
from wisparse_compile.kernels import Layout, Route
from wisparse_compile.passes.decisions import DenseReason, Outcome
from wisparse_compile.passes.graph_utils import copy_dynamo_graph_module
from wisparse_compile.passes.sparsify import rewrite_sparse_linears
from wisparse_compile.planned import WeightPlan, set_plan
from wisparse_compile.quant.tensors import Int8Weight


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(self.a(x) + self.a(x).relu())  # a is called twice: one thresholds input


def test_planned_linears_get_one_thresholds_input_per_weight():
    model = TwoLinears()
    set_plan([model.a.weight], WeightPlan("a", 1, 0.5, torch.full((8,), 0.1), False, model))
    gm, inputs = dynamo_graph(model, torch.randn(1, 8))
    result = rewrite_sparse_linears(gm, inputs)
    ops = [n for n in gm.graph.nodes if n.target is torch.ops.wisparse.sparse_linear.default]
    assert len(ops) == 2 and len({n.args[3] for n in ops}) == 1  # both calls of a read one input
    assert len(result.threshold_sources) == 1 and torch.equal(result.threshold_examples[0], torch.full((8,), 0.1))
    a1, a2, b = result.report.decisions
    assert (a1.decision, a1.name, a1.layout, a1.planned_sparsity) == (Outcome.SPARSE, "a", Layout.FLOAT, 0.5)
    assert a2.decision == Outcome.SPARSE and (b.decision, b.reason_kind) == (Outcome.DENSE, DenseReason.NO_PLAN)
    assert result.unplanned_weight_inputs == [b.weight_input]


def test_an_unplanned_quantized_weight_runs_the_dense_quantized_op():
    model = TwoLinears()
    model.b.weight = nn.Parameter(Int8Weight.from_float(model.b.weight.detach()), requires_grad=False)
    gm, inputs = dynamo_graph(model, torch.randn(1, 8))
    result = rewrite_sparse_linears(gm, inputs)
    (op,) = [n for n in gm.graph.nodes if n.target is torch.ops.wisparse.sparse_linear.default]
    assert op.args[3] is None and op.args[5] == "int8"  # no thresholds: dense
    b = result.report.decisions[-1]
    assert (b.decision, b.layout, b.node) == (Outcome.DENSE, Layout.INT8, op.name) and "dense int8 op" in b.reason
    assert not result.threshold_sources


def test_new_nodes_keep_source_location():
    seen = []

    def backend(gm, example_inputs):
        gm = copy_dynamo_graph_module(gm)
        result = rewrite_sparse_linears(gm, example_inputs)
        seen.extend(n for n in gm.graph.nodes if n.target is torch.ops.wisparse.sparse_linear.default)
        return lambda *args: gm.forward(*args, *result.threshold_examples)

    with torch.no_grad():
        torch.compile(planned_net(), backend=backend)(torch.randn(2, 16))
    assert len(seen) == 4
    for node in seen:
        assert "tests/debug/models.py" in node.meta["stack_trace"]
        assert "self.up(x)" in node.meta["stack_trace"] or "self.down(h)" in node.meta["stack_trace"]
        assert any("blocks" in str(path) for path, _ in node.meta["nn_module_stack"].values())


@pytest.mark.parametrize(("rows", "dynamic", "route"), [
    (2, False, Route.CPU_KERNEL), (16, False, Route.MASKED_DENSE), (2, True, Route.CPU_KERNEL), (16, True, Route.MASKED_DENSE),
])
def test_route_names_what_the_op_lowers_to(rows, dynamic, route):
    """Decode-sized CPU calls take the C++ kernel, larger ones masked dense; a symbolic row count
    gets the route of its hint (the op guards on it, so the graph serves only that side)."""
    reports = []

    def backend(gm, example_inputs):
        gm = copy_dynamo_graph_module(gm)
        result = rewrite_sparse_linears(gm, example_inputs, wsc.BackendConfig(max_sparse_rows=4))
        reports.append(result.report)
        return lambda *args: gm.forward(*args, *result.threshold_examples)

    x = torch.randn(rows, 16)
    if dynamic:
        torch._dynamo.mark_dynamic(x, 0)
    with torch.no_grad():
        torch.compile(planned_net(), backend=backend)(x)
    routes = {d.name: d.route for d in reports[-1].decisions}
    assert routes == {**dict.fromkeys(["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"], route), None: Route.DENSE}
