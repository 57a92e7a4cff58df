"""``benchmarks/gpu_check.py --dry-run``: the prepared GPU check runs end to end on the CPU (Triton
interpreter, tiny shapes), so the first GPU session only has to run it."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_passes_and_writes_its_records(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out-dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )
    [path] = (tmp_path / "gpu_check" / "dry-run").glob("*.json")
    result = json.loads(path.read_text())
    steps = {r["step"]: r for r in result["records"] if r["kind"] == "step"}
    targets = {r["name"]: r for r in result["records"] if r["kind"] == "target"}
    failed = {k: v.get("error") or v for k, v in steps.items() if not v.get("ok")}
    assert done.returncode == 0 and not failed, (failed, done.stdout[-3000:])
    assert result["bench"] == "gpu_check" and result["dry_run"] is True and "NOT figures" in result["note"]
    assert list(steps) == result["setup"]["steps"] == ["env", "kernel_tests", "tiny_decode", "kernel_bench", "decode_bench"]
    kernel = steps["kernel_tests"]
    assert kernel["passed"] == kernel["total"] >= 25
    decode = steps["tiny_decode"]
    assert decode["tokens_match"] and decode["plan_swap_tokens_match"] and decode["plan_swap_recompiles"] == 0
    assert set(targets) == {"kernel_vs_cublas_50pct_batch1", "kernel_vs_cublas_0pct_batch1", "decode_vs_dense_compile_50pct"}
    assert all(t["measured"] for t in targets.values())  # the dry run fills every field
    bench = steps["kernel_bench"]
    assert bench["int8_kernel"] and len(bench["measured_vs_modelled"]) == bench["records"]
    table = path.with_suffix(".md").read_text()
    assert "DRY RUN" in table and "| target |" in table
    # the benchmarks it runs write their own results, in the harness layout, beside it
    for step, bench_name in (("kernel_bench", "kernel_gpu"), ("decode_bench", "decode")):
        written = pathlib.Path(steps[step]["result"])
        assert written.parent == tmp_path / bench_name / "dry-run" and written.exists()
    assert {p.name for p in tmp_path.iterdir()} == {"gpu_check", "kernel_gpu", "decode"}  # nothing else, no flat files


def test_gpu_check_targets_and_table_from_records():
    """The target logic and the table, on hand-made step records (no run)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import gpu_check

    steps = {"kernel_bench": {"ok": True, "speedup_50pct_batch1": [1.9, 1.7], "speedup_0pct_batch1": [0.97]},
             "decode_bench": {"ok": False, "error": "timed out after 170 s"}}
    targets = gpu_check.targets(steps)
    assert targets["kernel_vs_cublas_50pct_batch1"]["met"] is False  # the worst shape counts
    assert targets["kernel_vs_cublas_0pct_batch1"]["met"] is True
    assert targets["decode_vs_dense_compile_50pct"]["met"] is None
    table = gpu_check.markdown({"dry_run": False, "order": ["kernel_bench", "decode_bench"], "steps": steps,
                                "targets": targets})
    assert "| decode_bench | NO |" in table and "timed out" in table and "not measured" in table
