"""The plain linear forms (``passes/rewrite_linears.py``): what a match reads off the weight it is given
(its input-channel dim and layout) and the ``sparse_linear`` call it emits for each layout."""

import operator

import pytest
import torch
from torch import nn

from tests.passes.conftest import dynamo_graph
from wisparse_compile.config import BackendConfig
from wisparse_compile.kernels import Layout
from wisparse_compile.passes.graph_utils import GraphInputs
from wisparse_compile.passes.rewrite_linears import match_linear
from wisparse_compile.quant.tensors import Int4Weight, Int8Weight


class Projections(nn.Module):
    def __init__(self, quantized=None):
        super().__init__()
        self.linear = nn.Linear(8, 6)
        self.conv1d = nn.Parameter(torch.randn(8, 6))  # [in, out], used as x @ W
        if quantized is not None:
            self.linear.weight = nn.Parameter(quantized.from_float(self.linear.weight.detach()), requires_grad=False)

    def forward(self, x):
        return self.linear(x) + x @ self.conv1d + torch.matmul(x, x.t()).sum()  # the last: attention-like, no weight


def _matches(model):
    gm, inputs = dynamo_graph(model, torch.randn(2, 8))
    graph_inputs = GraphInputs(gm.graph, inputs)
    return gm, [(node, m) for node in gm.graph.nodes if (m := match_linear(node, graph_inputs)) is not None]


def test_matches_read_the_weights_dim_and_layout():
    _, matches = _matches(Projections())
    assert [(m.form, m.in_dim, m.layout) for _, m in matches] == [("linear", 1, Layout.FLOAT), ("matmul", 0, Layout.FLOAT)]


@pytest.mark.parametrize(("cls", "layout"), [(Int8Weight, Layout.INT8), (Int4Weight, Layout.INT4)])
def test_quantized_weight_emits_sparse_linear_with_its_layout(cls, layout):
    gm, matches = _matches(Projections(cls))
    node, match = matches[0]
    assert match.layout is layout
    new = match.emit(gm.graph, node, None, BackendConfig())
    x, qdata, bias, thresholds, rows, name, scale, *rest = new.args
    assert new.target is torch.ops.wisparse.sparse_linear.default and (thresholds, rows, name) == (None, 8, layout.value)
    assert (qdata.target, qdata.args[1], scale.args[1]) == (getattr, "qdata", "scale")
    assert rest == ([6] if layout is Layout.INT4 else [])


def test_in_out_parameter_enters_as_its_transpose():
    gm, matches = _matches(Projections())
    node, match = matches[1]
    new = match.emit(gm.graph, node, None, BackendConfig(max_sparse_rows=3))
    assert new.args[1].target is torch.t and new.args[4] == 3 and len(new.args) == 5
    assert operator.is_(new.args[0], match.x)
