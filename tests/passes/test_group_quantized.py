"""The quantized-sibling pass: int8/int4 q/k/v and gate/up become one group call each, with the
output of the ungrouped graph; unplanned members group but stay reported dense; off when asked."""

import copy

import pytest
import torch

import wisparse_compile as wsc
from tests.conftest import tiny_llama, token_batches
from tests.helpers import logits
from wisparse_compile.passes.decisions import Outcome
from wisparse_compile.plan import SparsityPlan

_CALIBRATED: dict = {}


def _model_and_plan():
    if not _CALIBRATED:
        model = tiny_llama(0, layers=1)
        _CALIBRATED["model"] = copy.deepcopy(model)
        _CALIBRATED["plan"] = wsc.calibrate(model, token_batches(2), wsc.SparsityConfig(sparsity=0.5, method="teal"))
    return copy.deepcopy(_CALIBRATED["model"]), _CALIBRATED["plan"]


def _ops_in(graph, name, layout):
    """The ``wisparse::<name>`` calls of ``graph`` on weights of ``layout``."""
    op = getattr(torch.ops.wisparse, name).default
    return [n for n in graph.nodes if n.target is op and n.args[5] == layout]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_siblings_become_one_group_call_with_the_ungrouped_output(fmt, lowered_graphs):
    model, plan = _model_and_plan()
    wsc.attach(model, plan, weights=fmt)
    ids = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(3))
    grouped = logits(torch.compile(model, backend="wisparse"), ids)
    graph = lowered_graphs[-1].graph
    groups = _ops_in(graph, "sparse_linear_group", fmt)
    assert len(groups) == 2  # q/k/v and gate/up of the one layer
    assert sorted(len(g.args[1]) for g in groups) == [2, 3]
    assert len(_ops_in(graph, "sparse_linear", fmt)) == 3  # o, down and the dense head
    report = wsc.last_compile_report()
    fused = [d for d in report.decisions if d.decision == Outcome.FUSED]
    assert sorted(d.name.rsplit(".", 1)[-1] for d in fused) == ["gate_proj", "k_proj", "q_proj", "up_proj", "v_proj"]
    assert len({d.node for d in fused}) == 2 and all("siblings in" in d.reason for d in fused)
    assert report.rewritten == 7

    torch._dynamo.reset()
    apart = logits(torch.compile(model, backend=wsc.WisparseBackend(group_quantized=False)), ids)
    graph = lowered_graphs[-1].graph
    assert not _ops_in(graph, "sparse_linear_group", fmt) and len(_ops_in(graph, "sparse_linear", fmt)) == 8
    torch.testing.assert_close(grouped, apart, rtol=1e-5, atol=1e-5)


def test_an_unplanned_sibling_groups_but_stays_reported_dense(lowered_graphs):
    """An int8 weight left from an earlier plan runs as a dense member (thresholds None) of the group."""
    model, plan = _model_and_plan()
    names = [n for n in plan.channel_thresholds if not n.endswith("k_proj")]
    keep = lambda table: {n: table[n] for n in names if n in table}  # noqa: E731
    partial = SparsityPlan(
        keep(plan.channel_thresholds), keep(plan.sparsities), keep(plan.shapes), plan.model_class, plan.method,
        keep(plan.in_dims), plan.config, plan.stats,
    )
    wsc.attach(model, plan, weights="int8")
    wsc.attach(model, partial, weights="int8")  # k_proj keeps its int8 weight, now without a plan
    ids = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(4))
    out = logits(torch.compile(model, backend="wisparse"), ids)
    qkv = [g for g in _ops_in(lowered_graphs[-1].graph, "sparse_linear_group", "int8") if len(g.args[1]) == 3]
    assert len(qkv) == 1 and qkv[0].args[3][1] is None  # k's thresholds: None, a dense member
    k = [d for d in wsc.last_compile_report().decisions if d.node == qkv[0].name and d.decision != Outcome.FUSED]
    assert len(k) == 1 and k[0].decision == Outcome.DENSE and "siblings in" in k[0].reason
    torch._dynamo.reset()
    apart = logits(torch.compile(model, backend=wsc.WisparseBackend(group_quantized=False)), ids)
    torch.testing.assert_close(out, apart, rtol=1e-5, atol=1e-5)
