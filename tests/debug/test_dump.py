"""Debug output of the wisparse backend: per-graph code before/after, diff, and linear report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import wisparse_compile as wsc
from tests.conftest import tiny_llama, token_batches
from tests.debug.models import Net, planned_net
from wisparse_compile.kernels import Route
from wisparse_compile.passes.decisions import CompileReport, DenseReason

ROOT = Path(__file__).resolve().parents[2]


def _graphs(debug_dir: Path) -> list[Path]:
    return sorted(p for p in debug_dir.iterdir() if p.is_dir())


def _report(folder: Path) -> CompileReport:
    return CompileReport.from_json((folder / "linears.json").read_text())


def _run(model, x, **options):
    with torch.no_grad():
        return torch.compile(model, backend="wisparse", options=options or None)(x)


def test_tiny_llama_report_lists_every_linear(tmp_path):
    model = tiny_llama(layers=1)
    plan = wsc.calibrate(model, token_batches(1), wsc.SparsityConfig(sparsity=0.4))
    wsc.attach(model, plan)
    _run(model, torch.randint(0, 256, (1, 6)), debug_dir=str(tmp_path))
    (folder,) = _graphs(tmp_path)
    report = _report(folder)
    rows = {d.module: d for d in report.decisions}
    assert set(rows) == {*plan.names, "lm_head"}
    for name in plan.names:
        assert (rows[name].decision, rows[name].reason, rows[name].route) == ("sparse", "", Route.CPU_KERNEL)
        assert rows[name].planned_sparsity == pytest.approx(plan.sparsities[name])
        assert rows[name].weight_shape == tuple(plan.shapes[name]) and rows[name].dtype == "float32"
    head = rows["lm_head"]
    assert (head.decision, head.reason_kind, head.planned_sparsity) == ("dense", DenseReason.NO_PLAN, None)
    assert head.route == Route.DENSE
    assert report.counts == {"found": 8, "rewritten": 7, "fused": 0, "dense": 1}
    diff = (folder / "diff.patch").read_text()
    assert diff.count("\n+") > 0 and diff.count("torch.ops.wisparse.sparse_linear.default(") == 7
    assert "torch.ops.wisparse" not in (folder / "before.py").read_text()
    table = (folder / "linears.txt").read_text()
    assert "model.layers.0.mlp.down_proj" in table and "7 rewritten, 0 fused, 1 left dense" in table


def test_diff_is_empty_exactly_when_nothing_is_rewritten(tmp_path, monkeypatch):
    x = torch.randn(3, 16)
    # no plan, directory from the environment: unplanned linears named from their Dynamo sources
    monkeypatch.setenv("WISPARSE_DEBUG_DIR", str(tmp_path / "env"))
    _run(Net().eval(), x)
    (folder,) = _graphs(tmp_path / "env")
    assert (folder / "diff.patch").read_text() == ""
    report = _report(folder)
    assert [d.module for d in report.decisions] == ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down", "head"]
    assert {(d.decision.value, d.reason_kind.value) for d in report.decisions} == {("dense", "no plan entry")}
    monkeypatch.delenv("WISPARSE_DEBUG_DIR")

    # planned but prefill-sized with mask_prefill=False: nothing rewritten, empty diff, reason given
    torch._dynamo.reset()
    net = planned_net()
    _run(net, torch.randn(16, 16), debug_dir=str(tmp_path / "prefill"), mask_prefill=False, max_sparse_rows=4)
    (folder,) = _graphs(tmp_path / "prefill")
    assert (folder / "diff.patch").read_text() == ""
    kinds = {d.module: d.reason_kind.value for d in _report(folder).decisions}
    assert kinds == {**dict.fromkeys(["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"], "prefill size"), "head": "no plan entry"}

    # the same model at decode size: rewritten, non-empty diff
    torch._dynamo.reset()
    _run(net, torch.randn(2, 16), debug_dir=str(tmp_path / "decode"), mask_prefill=False, max_sparse_rows=4)
    (folder,) = _graphs(tmp_path / "decode")
    assert _report(folder).counts["rewritten"] == 4 and (folder / "diff.patch").read_text().startswith("---")


def test_unsupported_dtype_is_reported(tmp_path):
    net = planned_net(bf16_down=True)
    _run(net, torch.randn(2, 16), debug_dir=str(tmp_path))
    (folder,) = _graphs(tmp_path)
    rows = {d.module: d for d in _report(folder).decisions}
    mixed = rows["blocks.1.down"]
    assert (mixed.decision, mixed.reason_kind, mixed.dtype) == ("dense", DenseReason.DTYPE_MISMATCH, "bfloat16")
    assert mixed.planned_sparsity == pytest.approx(wsc.attached_plan(net).sparsities["blocks.1.down"])
    assert "differs from weight dtype" in mixed.reason
    assert rows["blocks.1.up"].decision == "sparse"
    assert "dtype mismatch: input dtype float32 differs" in (folder / "linears.txt").read_text()


def test_torch_logs_and_trace_artifacts(tmp_path):
    """TORCH_LOGS="+wisparse_compile" shows the decisions; TORCH_TRACE gets the graphs for tlparse."""
    script = (
        "import torch\n"
        "from tests.debug.models import planned_net\n"
        "with torch.no_grad():\n"
        "    torch.compile(planned_net(), backend='wisparse')(torch.randn(2, 16))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_LOGS": "+wisparse_compile", "TORCH_TRACE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sparse: blocks.0.up" in done.stderr
    assert "dense: linear_4" in done.stderr and "no plan entry" in done.stderr
    assert "4 rewritten, 0 fused, 1 left dense" in done.stderr  # the linear table at DEBUG
    trace = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    for name in ("wisparse_graph_before", "wisparse_graph_after", "wisparse_linears"):
        assert json.dumps(name) in trace
    assert "torch.ops.wisparse.sparse_linear.default" in trace


def test_fused_linears_count_alike_in_the_report_and_its_debug_view(tmp_path):
    """One report model: the debug files and the backend's report give the same counts, fused included."""
    model = tiny_llama(layers=1)
    plan = wsc.calibrate(model, token_batches(1), wsc.SparsityConfig(sparsity=0.4))
    wsc.attach(model, plan)
    _run(model, torch.randint(0, 256, (1, 1)), debug_dir=str(tmp_path), fuse_siblings=True)
    (folder,) = _graphs(tmp_path)
    written = _report(folder)
    assert written == wsc.last_compile_report()
    assert written.counts == {"found": 8, "rewritten": 7, "fused": 5, "dense": 1}
    assert "7 rewritten, 5 fused, 1 left dense" in (folder / "linears.txt").read_text()
