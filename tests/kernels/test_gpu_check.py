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
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    failed = {k: v.get("error") or v for k, v in summary["steps"].items() if not v.get("ok")}
    assert done.returncode == 0 and summary["ok"], (failed, done.stdout[-3000:])
    assert summary["order"] == ["env", "kernel_tests", "tiny_decode", "kernel_bench", "decode_bench"]
    kernel = summary["steps"]["kernel_tests"]
    assert kernel["passed"] == kernel["total"] >= 25
    decode = summary["steps"]["tiny_decode"]
    assert decode["tokens_match"] and decode["plan_swap_tokens_match"] and decode["plan_swap_recompiles"] == 0
    assert set(summary["targets"]) == {"kernel_vs_cublas_50pct_batch1", "kernel_vs_cublas_0pct_batch1",
                                       "decode_vs_dense_compile_50pct"}
    assert all(t["measured"] for t in summary["targets"].values())  # the dry run fills every field
    table = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN" in table and "| target |" in table
    assert (tmp_path / "kernel_smoke.json").exists() and (tmp_path / "decode_smoke.json").exists()
    for step in summary["order"]:
        assert (tmp_path / "gpu_check" / f"{step}.json").exists()


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
