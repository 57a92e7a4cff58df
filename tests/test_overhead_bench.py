"""benchmarks/overhead_bench.py runs end to end on the tiny model and writes its record."""

import json

from benchmarks import overhead_bench

KEYS = {
    "model", "plan", "threshold_inputs", "decode_steps", "step_ms", "wrapper_us_per_step_in_situ",
    "wrapper_us_per_call_isolated", "per_call_lookup_us_previous_design", "wrapper_share_of_step", "meets_targets",
}


def test_overhead_bench_dry_run(tmp_path):
    result = overhead_bench.main(["--dry-run", "--steps", "3", "--out-dir", str(tmp_path)])
    path = tmp_path / "overhead" / "dry-run" / f"{result['date']}-tiny.json"
    data = json.loads(path.read_text())
    assert {k: v for k, v in result.items() if k != "path"} == json.loads(json.dumps(data))
    (record,) = data["records"]
    assert KEYS <= record.keys()
    assert record["threshold_inputs"] == 14 and record["decode_steps"] == 3
    assert record["step_ms"] > 0 and record["wrapper_us_per_call_isolated"] >= 0
    assert "wrapper per step (in situ)" in path.with_suffix(".md").read_text()
