"""benchmarks/cpu_bench.py on a tiny model: one compile per model, none per plan swap; kernel rows
read cold weight copies; the peer table says why a peer is missing."""

import json

import pytest

from benchmarks import cpu_bench
from tests.conftest import tiny_llama


def test_dry_run_compiles_once_per_model_and_never_on_a_plan_swap(tmp_path):
    """``cpu_bench.py --dry-run``: kernel rows and decode rows of a tiny model, written in the harness layout."""
    result = cpu_bench.main(["--dry-run", "--out-dir", str(tmp_path)])
    path = tmp_path / "cpu" / "dry-run" / f"{result['date']}.json"
    data = json.loads(path.read_text())
    assert data["bench"] == "cpu" and data["dry_run"] and "NOT figures" in data["note"]
    assert json.loads(json.dumps({k: v for k, v in result.items() if k != "path"})) == data
    records = [r for r in data["records"] if r["kind"] == "decode"]
    assert [r["sparsity"] for r in records] == list(cpu_bench.DECODE_SPARSITIES)
    r = records[0]
    assert r["graphs_compiled_in_warmup"] == {"dense": 1, "0.0": 1, "0.4": 0, "0.5": 0}
    # at sparsity 0 the sparse model decodes the dense model's tokens (same weights, same prefill)
    assert r["warmup_tokens"]["0.0"] == r["warmup_tokens"]["dense"]
    assert {"build_models", "calibrate", "prefill", "warmup_dense", "warmup_0.0", "rounds"} <= r["phase_s"].keys()
    assert all(x["dense_tokens_per_s"] > 0 and x["sparse_tokens_per_s"] > 0 for x in records)
    kernels = [r for r in data["records"] if r["kind"] == "kernel"]
    assert len(kernels) == len(cpu_bench.DTYPES) * len(cpu_bench.KERNEL_SPARSITIES)
    assert "| tiny random Llama | fp32 | 0.5 |" in path.with_suffix(".md").read_text()


def test_bench_kernels_cycles_cold_weight_copies(monkeypatch):
    """Each call takes the next weight copy (so weights come from DRAM, not a cache-resident matrix)."""
    from wisparse_compile.kernels import cpu_kernel_available

    assert cpu_kernel_available()
    monkeypatch.setattr(cpu_bench, "SHAPES", {"tiny": [(24, 40)]})
    monkeypatch.setattr(cpu_bench, "COLD_BYTES", 3 * 24 * 40 * 4)  # three fp32 copies
    seen = []
    real_linear = cpu_bench.F.linear
    monkeypatch.setattr(cpu_bench.F, "linear", lambda x, w: seen.append(w.data_ptr()) or real_linear(x, w))
    records = cpu_bench.bench_kernels(rounds=2, batches=(1,))
    assert len(records) == len(cpu_bench.DTYPES) * len(cpu_bench.KERNEL_SPARSITIES)
    assert len(set(seen[: 2 * 3])) == 3  # fp32: dense calls rotate through all three copies
    assert all(r["speedup"] > 0 and r["dense_ms"] > 0 for r in records)


@pytest.mark.slow  # compiles three models (dense Inductor, wisparse int8, wisparse int4)
def test_bench_peer_runs_ours_int8_side_by_side_and_notes_a_missing_peer():
    """Without a GGUF file (a tiny random model) the llama.cpp row says why it is empty; ours run
    interleaved, the int8 plan swap compiles nothing new, and the profile breaks a step into ops."""
    records = cpu_bench.bench_peer(
        "tiny", lambda: tiny_llama(layers=1), None, new_tokens=3, rounds=1, calib_tokens=32, profile=True
    )
    peer = {r["setting"]: r for r in records if r["kind"] == "peer"}
    assert list(peer) == list(cpu_bench.PEER_SETTINGS)
    assert peer["llama.cpp"]["tokens_per_s"] is None and "no GGUF" in peer["llama.cpp"]["note"]
    assert all(peer[k]["tokens_per_s"] > 0 for k in ("dense fp32", "dense int8", "int8 + 50%", "int4 + 50%"))
    assert peer["dense int8"]["graphs_compiled_in_warmup"] == 1 and peer["int8 + 50%"]["graphs_compiled_in_warmup"] == 0
    assert peer["int4 + 50%"]["graphs_compiled_in_warmup"] == 1  # its own graph, not the int8 one
    (profile,) = [r for r in records if r["kind"] == "profile"]
    assert profile["step_ms"] > 0 and 0 < sum(o["share"] for o in profile["ops"]) <= 1 + 1e-9
    assert any("sparse_gemv_int8" in o["op"] for o in profile["ops"])
    assert "| tiny | llama.cpp | - (no GGUF" in cpu_bench.markdown(records)
