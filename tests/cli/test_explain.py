"""``wisparse explain`` (``cli/explain.py``): a table per graph and the totals, or why there is none
(the session's loading and compiling replaced: what explain adds is its summary)."""

import argparse

from wisparse_compile.cli import explain
from wisparse_compile.cli.session import CompiledGraph
from wisparse_compile.passes.decisions import CompileReport, DenseReason, LinearDecision, Outcome


def _args(**overrides) -> argparse.Namespace:
    return argparse.Namespace(**{"model": "m", "color": "never", "debug_dir": None, **overrides})


def _session(monkeypatch, graphs):
    monkeypatch.setattr(explain, "load_model", lambda spec: object())
    monkeypatch.setattr(explain, "attach_plan", lambda model, args: None)
    monkeypatch.setattr(explain, "compile_into", lambda model, args, folder: graphs)


def test_no_graph_is_an_error(monkeypatch, capsys):
    _session(monkeypatch, [])
    assert explain.run(_args()) == 1
    assert "no graph reached the wisparse backend" in capsys.readouterr().err


def test_a_table_per_graph_and_the_totals(monkeypatch, capsys, tmp_path):
    def report(graph, outcomes):
        decisions = [LinearDecision(f"n{i}", "linear", None, (2, 2), "float32", decision=o, module=f"m{i}")
                     for i, o in enumerate(outcomes)]
        for d in decisions:
            if d.decision == Outcome.DENSE:
                d.leave_dense(DenseReason.NO_PLAN)
        return CompileReport(decisions, graph=graph)

    graphs = [CompiledGraph(tmp_path / "a", report("0", [Outcome.SPARSE, Outcome.DENSE])),
              CompiledGraph(tmp_path / "b", report("1", [Outcome.FUSED, Outcome.FUSED, Outcome.SPARSE]))]
    _session(monkeypatch, graphs)
    assert explain.run(_args(debug_dir=str(tmp_path))) == 0
    out = capsys.readouterr().out
    assert out.count("graph ") == 2 and "\033[" not in out
    assert "2 graph(s): 5 linears found, 4 rewritten, 2 fused, 1 left dense" in out
    assert f"debug files: {tmp_path}" in out
