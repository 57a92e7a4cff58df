"""The kernel and decode benchmarks run end to end in --dry-run mode and write the harness's result schema."""

import json

from benchmarks import decode_bench, kernel_bench
from benchmarks.harness import RESULT_KEYS

KERNEL_KEYS = {"shape", "dtype", "batch", "sparsity", "dense_ms", "sparse_ms", "speedup"}
DECODE_KEYS = {"model", "dtype", "sparsity", "dense_tokens_per_s", "sparse_tokens_per_s", "speedup"}


def _harness_result(tmp_path, bench: str, result: dict) -> dict:
    """The result file ``bench`` wrote under ``tmp_path`` (the harness layout), checked against what it returned."""
    path = tmp_path / bench / "dry-run" / f"{result['date']}.json"
    data = json.loads(path.read_text())
    assert set(RESULT_KEYS) == data.keys() and data["bench"] == bench and data["dry_run"] is True
    assert "NOT figures" in data["note"] and "NOT figures" in path.with_suffix(".md").read_text()
    assert result["records"] == data["records"] and result["path"] == str(path)
    return data


def test_kernel_bench_dry_run_schema(tmp_path):
    result = kernel_bench.main(["--dry-run", "--out-dir", str(tmp_path)])
    data = _harness_result(tmp_path, "kernel_gpu", result)
    assert result["smoke"] is True and "NOT speed figures" in (tmp_path / "kernel_gpu" / "dry-run" / f"{data['date']}.md").read_text()
    assert data["setup"]["batches"] == [1, 2] and data["setup"]["sparsities"] == [0.0, 0.5]
    assert len(data["records"]) == 2 * 2 * 2 * 2
    for r in data["records"]:
        assert KERNEL_KEYS <= r.keys()
        assert len(r["shape"]) == 2 and r["dense_ms"] > 0 and r["sparse_ms"] > 0
        assert r["max_abs_err"] <= (1e-4 if r["dtype"] == "float32" else 5e-2), r
        if r["sparsity"] == 0.0:
            assert r["rows_loaded"] == 1.0
        else:
            assert r["rows_loaded"] < 1.0


def test_decode_bench_dry_run_schema(tmp_path):
    result = decode_bench.main(["--dry-run", "--out-dir", str(tmp_path)])
    data = _harness_result(tmp_path, "decode", result)
    assert result["smoke"] is True and result["records"] == data["records"]
    assert [r["sparsity"] for r in data["records"]] == [0.5]
    for r in data["records"]:
        assert DECODE_KEYS <= r.keys()
        assert r["dense_tokens_per_s"] > 0 and r["sparse_tokens_per_s"] > 0


def test_kernel_bench_cpu_quick_reports_gbps_next_to_the_read_loop(tmp_path):
    result = kernel_bench.main(["--cpu", "--quick", "--out-dir", str(tmp_path)])
    data = _harness_result(tmp_path, "kernel_cpu", result)
    assert len(data["load_average"]) == 2  # before and after the run
    assert {(r["weights"], r["sparsity"]) for r in data["records"]} == {(w, s) for w in ("float32", "int8") for s in (0.0, 0.5)}
    for r in data["records"]:
        assert r["gbps"] > 0 and r["read_loop_gbps"] > 0
        assert abs(r["fraction_of_read_loop"] - r["gbps"] / r["read_loop_gbps"]) < 1e-9 and r["fraction_of_fp32_kernel"] > 0
        assert r["rows_loaded"] == 1.0 if r["sparsity"] == 0 else r["rows_loaded"] < 1.0
