"""The sparsify pass (``passes/sparsify.py``): planned linears become ``sparse_linear`` fed by one appended
thresholds input per weight, unplanned ones stay and say why, and an unplanned quantized weight runs the
dense quantized op, its layout recorded."""

import torch
from torch import nn

from tests.passes.conftest import dynamo_graph
from wisparse_compile.kernels import Layout
from wisparse_compile.passes.decisions import DenseReason, Outcome
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
