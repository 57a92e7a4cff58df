"""The one report model: counts that agree on fused linears, a summary, and a JSON round trip that
gives back the same decisions (enums included) for the debug folders and the CLI."""

from wisparse_compile.kernels import Layout, Route
from wisparse_compile.passes.decisions import CompileReport, DenseReason, LinearDecision, Outcome


def _report() -> CompileReport:
    sparse = LinearDecision("sparse_linear", "linear", "a", (8, 4), "float32", Outcome.SPARSE, route=Route.CPU_KERNEL,
                            layout=Layout.FLOAT, weight_input=1, planned_sparsity=0.5, module="a")
    fused = LinearDecision("sparse_linear_group", "addmm", "b", (8, 4), "bfloat16", Outcome.FUSED, "one of 2 siblings",
                           route=Route.MASKED_DENSE, layout=Layout.INT8, weight_input=2, planned_sparsity=0.25)
    dense = LinearDecision("linear_2", "linear", None, None, None, weight_input=3, module="lm_head").leave_dense(DenseReason.NO_PLAN)
    return CompileReport([sparse, fused, dense], rank=1, graph="0/0")


def test_counts_take_fused_linears_as_rewritten():
    report = _report()
    assert report.rewritten == 2
    assert report.counts == {"found": 3, "rewritten": 2, "fused": 1, "dense": 1}
    assert report.summary() == "rank 1: 3 linears: 2 sparse, 1 dense (1 no plan entry)"


def test_json_round_trip_keeps_every_field():
    report = _report()
    again = CompileReport.from_json(report.to_json())
    assert again == report
    assert again.decisions[1].layout is Layout.INT8 and again.decisions[2].reason_kind is DenseReason.NO_PLAN
    assert again.decisions[0].weight_shape == (8, 4) and again.decisions[2].route is Route.DENSE
