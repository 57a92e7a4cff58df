"""benchmarks/gpu_model.py: the bandwidth model reads compiled kernels and ranks configs (no GPU)."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the model compiles for sm_90
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_dry_run_prints_a_ranked_table():
    out = _run("from benchmarks import gpu_model; gpu_model.main(['--dry-run'])")
    rows = [line for line in out.splitlines() if line.startswith("| H100")]
    assert len(rows) == 2  # the two BLOCK_K configs of the 1-row bucket
    fractions = [float(r.split("|")[14].strip().rstrip("%")) for r in rows]
    assert fractions == sorted(fractions, reverse=True) and all(0 < f <= 100 for f in fractions)


def test_predictions_follow_sparsity_occupancy_and_littles_law():
    code = (
        "import json, torch; from benchmarks import gpu_model as m\n"
        "h = m.GPUS[1]\n"
        "dense = m.predict(h, 'float', torch.bfloat16, 1, 1024, 2048, 0.0)\n"
        "half = m.predict(h, 'float', torch.bfloat16, 1, 1024, 2048, 0.5)\n"
        "print(json.dumps([[p.__dict__ for p in dense], [p.__dict__ for p in half], m.gpu_profile('NVIDIA H200', 132).name,"
        " m.gpu_profile('Tesla V100', 80).name]))\n"
    )
    dense, half, h200, unknown = json.loads(_run(code).splitlines()[-1])
    for d, s in zip(dense, half):
        assert s["mb_moved"] < 0.6 * d["mb_moved"]  # half the rows, plus x, thresholds, workspace
        assert s["in_flight_kb_per_sm"] == d["in_flight_kb_per_sm"] / 2  # pruned rows are not in flight
        assert 0 < s["fraction_of_peak"] <= 1 and s["ctas_per_sm"] >= 1 and s["registers"] <= 128
        needed = 3.35e12 * 700e-9 / 132 / 1024
        assert abs(s["needed_kb_per_sm"] - round(needed, 1)) < 0.1
    assert h200 == "H200" and "H100 bandwidth assumed" in unknown
