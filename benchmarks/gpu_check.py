"""The GPU check: everything the Triton route must prove on first contact with a GPU, in one run.

    PYTHONPATH=$PWD python benchmarks/gpu_check.py              # on one H100/H200: at most ~8.5 minutes
    PYTHONPATH=$PWD python benchmarks/gpu_check.py --dry-run    # anywhere: CPU, Triton interpreter, tiny shapes

Steps, each in its own process with its own timeout (one failing or hanging step loses only itself):

- ``env``: device, torch / triton / transformers versions.
- ``kernel_tests``: the Triton sparse GEMV (eager launch) against the fp32 reference: bf16/fp16/fp32,
  M = 1, 2, 4, 8, the 4096x14336 and 14336x4096 shapes, one and several K slices, fused segments,
  NaN/Inf rows; the compiled op (Inductor inlines the kernel, checked in its code) with a symbolic
  batch; an lm_head-sized weight past 2^31 elements (64-bit offsets); and the op's host code free of
  device-to-host syncs (a CUDA stream capture of the decode op); the int8 variant
  (``sparse_gemv_int8``: int8 codes, fp32 scales, bf16 activations) at M = 1 and 4, one and several K slices.
- ``tiny_decode``: a tiny random Llama, greedy decode with ``mode="reduce-overhead"`` (CUDA graphs),
  token for token against the eager masked reference; the number of CUDA-graph recordings, and
  that a plan swap neither recompiles nor re-records and uses the new thresholds; compile time and
  GEMV configs compiled, backend vs plain Inductor.
- ``kernel_bench``: ``kernel_bench.py`` on a quick grid (4096x14336 and 14336x4096, sparsity
  0/0.5/0.7, batch 1 and 4, bf16) in its JSON schema; then the int8 op (compiled
  ``sparse_linear`` on int8 weights, bf16 activations) at 0% and 50%, batch 1, on the same shapes against
  cuBLAS bf16 ``F.linear`` (reported, no target: the bytes halve again, so up to 2x at 0% and 4x at 50%).
- ``decode_bench``: ``decode_bench.py`` on the random 1.1B Llama at sparsity 0 and 0.5 (bf16,
  reduce-overhead).

Targets, reported as met or not: kernel >= 1.8x cuBLAS at 50% sparsity, batch 1 (the limit is 2x);
kernel >= 0.95x cuBLAS at 0%; decode >= 1.5x dense ``torch.compile`` at 50%.

Writes through the harness (``harness.write_result``) under ``benchmarks/results/`` (``--out-dir``):
``gpu_check/<gpu>/<date>.json`` (a record per step, including the int8 op's timings and measured vs
modelled per point, and one per target) and the readable table beside it; the two benchmarks it runs
write their own, ``kernel_gpu/<gpu>/<date>`` and ``decode/<gpu>/<date>``. ``--dry-run`` runs every step on
the CPU (the Triton interpreter, tiny shapes, the C++ kernel in the tiny decode) and writes to a
temporary folder unless ``--out-dir`` is given: it proves the script, its numbers are NOT speed figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

from benchmarks.harness import out_dir_for, write_result
from wisparse_compile.files import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
#: Seconds each step may take on the GPU (8.5 minutes in all, start-up included) and in a dry run.
STEP_TIMEOUTS = {"env": (30, 60), "kernel_tests": (100, 240), "tiny_decode": (70, 300),
                 "kernel_bench": (130, 240), "decode_bench": (180, 300)}
#: The whole check's budget in seconds (GPU); a step never gets more than what is left of it.
BUDGET_S = 510
STEPS = tuple(STEP_TIMEOUTS)
TARGETS = {
    "kernel_vs_cublas_50pct_batch1": 1.8,
    "kernel_vs_cublas_0pct_batch1": 0.95,
    "decode_vs_dense_compile_50pct": 1.5,
}


# ----------------------------------------------------------------------------------------- steps


def step_env(dry: bool, out: Path) -> dict:
    import torch

    record = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "dry_run": dry, "ok": True}
    for name in ("triton", "transformers"):
        try:
            record[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001  (a missing package is a finding, not a crash)
            record[name] = f"missing ({e})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        record.update(device=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
        arch = 10 * props.major + props.minor
    else:
        record["device"] = "cpu (dry run: Triton interpreter)"
        arch = 90
    record["toolchain"] = _toolchain(arch)
    print(record["toolchain"]["choice"], flush=True)
    return record


def _toolchain(arch: int) -> dict:
    """Driver CUDA version, the ptxas versions Triton has, the PTX version it emits, and which ptxas
    assembles for ``sm_{arch}`` on this host (triton_toolchain.configure_ptxas's one line)."""
    from wisparse_compile.kernels import triton_toolchain as tc

    fmt = lambda v: None if v is None else f"{v[0]}.{v[1]}"  # noqa: E731
    record: dict = {"driver_cuda": fmt(tc.driver_cuda_version()),
                    "ptxas": {p.path.rsplit("/", 1)[-1]: fmt(p.cuda) for p in tc.bundled_ptxas()}}
    choice = tc.configure_ptxas(arch)
    record["choice"] = choice.line
    if choice.ptxas is not None:
        from triton.backends.nvidia.compiler import ptx_get_version

        record["ptx_version"] = ptx_get_version(fmt(choice.ptxas.cuda))
    return record


def _max_rel_err(out, ref) -> float:
    import torch

    finite = ref.isfinite()
    scale = max(1.0, ref[finite].abs().max().item()) if finite.any() else 1.0
    return ((out.float() - ref)[finite].abs().max().item() / scale) if finite.any() else 0.0


def _deployed_launches(n: int, k: int, m: int, element_bytes: int, form: str, one_slice: bool, dry: bool) -> list:
    """Explicit launches of every config the autotuner keeps for this call, at the K split the host
    picks on an H100 (and one K slice too where ``one_slice``); a dry run takes the first config
    only (the interpreter's time, not a finding)."""
    import triton

    from wisparse_compile.kernels import triton_sparse_gemv as g

    block_m = triton.next_power_of_2(min(m, g.ROWS_PER_LAUNCH[form]))
    warps = g.warps_for(n, element_bytes)
    split = g.split_k_for(triton.cdiv(n, g.block_n_for(warps, element_bytes)), warps, k, g.DEFAULT_SMS)
    configs = g.gemv_configs(block_m, n, element_bytes, form)[: 1 if dry else None]
    return [g.Launch(None, c.kwargs["BLOCK_K"], s, warps) for c in configs for s in sorted({split, 1} if one_slice else {split})]


def step_kernel_tests(dry: bool, out: Path) -> dict:
    import torch

    from wisparse_compile.kernels import sparse_gemv, sparse_gemv_fused, sparse_linear_reference
    from wisparse_compile.passes.fuse_siblings import fused_weight

    device = "cpu" if dry else "cuda"
    tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
    shapes = [(96, 160), (160, 96)] if dry else [(4096, 14336), (14336, 4096)]  # [out, in]
    cases, failures = [], []

    def operands(m, n, k, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(m, k, generator=g).to(device, dtype)
        w = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype).t().contiguous().t()
        b = torch.randn(n, generator=g).to(device, dtype)
        t = torch.full((k,), 0.6745, device=device)  # |N(0,1)| median: about half the channels kept
        return x, w, b, t

    def check(name, out, ref, dtype):
        err = _max_rel_err(out, ref)
        same_nonfinite = bool(torch.equal(out.float().isnan(), ref.to(dtype).float().isnan()))
        ok = err <= tol[dtype] and same_nonfinite and out.dtype == dtype
        cases.append({"case": name, "max_rel_err": err, "ok": ok})
        if not ok:
            failures.append(name)

    for n, k in shapes:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for m in (1, 2, 4, 8):
                x, w, b, t = operands(m, n, k, dtype)
                ref = sparse_linear_reference(x.float(), w.float(), b.float(), t)
                # the split the op would choose (and, in bf16, one K slice) with a fixed tile: one
                # compile per case, no autotuning (the autotuned path follows, and the benchmarks use it)
                # each config the autotuner may keep, at the split the op would choose (and, in bf16,
                # one K slice): one compile per case (the autotuned path follows, and the benchmarks use it)
                for launch in _deployed_launches(n, k, m, w.element_size(), "float", one_slice=dtype == torch.bfloat16, dry=dry):
                    check(f"{n}x{k} {str(dtype)[6:]} M={m} BLOCK_K={launch.block_k} split={launch.split_k}",
                          sparse_gemv(x, w, b, t, launch=launch), ref, dtype)
    # autotuned (the deployed path), bf16, batch 1 and 4
    for n, k in shapes:
        for m in (1, 4):
            x, w, b, t = operands(m, n, k, torch.bfloat16, seed=1)
            check(f"{n}x{k} bfloat16 M={m} autotuned", sparse_gemv(x, w, b, t),
                  sparse_linear_reference(x.float(), w.float(), b.float(), t), torch.bfloat16)
    # fused segments whose ends fall inside column blocks, NaN/Inf rows
    n, k = shapes[0]
    splits = [n // 2 + 5, n // 4 - 5, n - (n // 2 + 5) - (n // 4 - 5)]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, k, generator=g).to(device, torch.bfloat16)
    x[1, 3], x[2, 5] = float("nan"), float("inf")
    ws = [(torch.randn(s, k, generator=g) / k**0.5).to(device, torch.bfloat16) for s in splits]
    ts = [torch.rand(k, generator=g).to(device) for _ in splits]
    bs = [torch.randn(s, generator=g).to(device, torch.bfloat16) if i != 1 else None for i, s in enumerate(splits)]
    ref = torch.cat([sparse_linear_reference(x.float(), w.float(), None if b is None else b.float(), t)
                     for w, b, t in zip(ws, bs, ts)], -1)
    check("fused 3 segments, NaN/Inf rows", sparse_gemv_fused(x, fused_weight(ws, (False,) * 3), bs, ts, splits), ref, torch.bfloat16)

    # int8 weights (codes [in, out] + fp32 scales), bf16 activations: one K slice and the op's split
    from wisparse_compile.kernels import sparse_gemv_int8, sparse_linear_reference
    from wisparse_compile.quant.primitives import quantize_int8

    for n, k in shapes:
        for m in (1, 4):
            x, w, b, t = operands(m, n, k, torch.bfloat16, seed=3)
            q, sc = quantize_int8(w.float())
            ref = sparse_linear_reference(x.float(), q, b.float(), t, "int8", sc)
            for launch in _deployed_launches(n, k, m, 1, "int8", one_slice=True, dry=dry):
                check(f"int8 {n}x{k} bfloat16 M={m} BLOCK_K={launch.block_k} split={launch.split_k}",
                      sparse_gemv_int8(x, q, sc, b, t, launch=launch), ref, torch.bfloat16)
    # int4 weights (packed codes, per-group scales): the autotuned path, rows one launch each
    from wisparse_compile.kernels.triton_sparse_gemv import sparse_gemv_int4_triton
    from wisparse_compile.quant.primitives import quantize_int4

    for n, k in shapes:
        for m in (1, 3):
            x, w, b, t = operands(m, n, k, torch.bfloat16, seed=4)
            q, sc = quantize_int4(w.float())
            ref = sparse_linear_reference(x.float(), q, b.float(), t, "int4", sc, n)
            check(f"int4 {n}x{k} bfloat16 M={m} autotuned", sparse_gemv_int4_triton(x, q, sc, n, t, b), ref, torch.bfloat16)

    record: dict = {"cases": cases}
    if not dry:
        record.update(_compiled_and_graph_checks())
        record.update(_large_offsets_check())
    ok = not failures and all(record.get(key, True) for key in ("inlined_ok", "dynamic_ok", "capture_ok", "large_offsets_ok"))
    record.update(failures=failures, ok=ok, passed=sum(c["ok"] for c in cases), total=len(cases))
    return record


def _compiled_and_graph_checks() -> dict:
    """Compiled op: Inductor inlines the kernel; a symbolic batch keeps it; the eager op's decode
    route captures into a CUDA graph (any host sync would fail the capture)."""
    from unittest import mock

    import torch
    from torch._inductor.graph import GraphLowering

    from wisparse_compile.kernels import sparse_linear_reference

    record: dict = {}
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(1024, 2048, generator=g) / 45).cuda().half().t().contiguous().t()
    b = torch.randn(1024, generator=g).cuda().half()
    t = torch.full((2048,), 0.6745, device="cuda")
    codes: list[str] = []
    fn = torch.compile(lambda x: torch.ops.wisparse.sparse_linear(x, w, b, t, 8), dynamic=True)
    errs = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        for m in (2, 3, 5):
            x = torch.randn(m, 2048, device="cuda").half()
            errs.append(_max_rel_err(fn(x), sparse_linear_reference(x.float(), w.float(), b.float(), t)))
    code = "\n".join(codes)
    record["inlined_ok"] = "_sparse_gemv_kernel" in code and "torch.ops.wisparse" not in code and max(errs) < 4e-3
    record["dynamic_ok"] = len(codes) == 1  # batches 2, 3, 5: one graph, the kernel in it
    record["compiled_max_rel_err"] = max(errs)

    x = torch.randn(1, 2048, device="cuda").half()
    torch.ops.wisparse.sparse_linear(x, w, b, t, 8)  # autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            y = torch.ops.wisparse.sparse_linear(x, w, b, t, 8)
        x.copy_(torch.randn(1, 2048, device="cuda").half())
        graph.replay()
        torch.cuda.synchronize()
        err = _max_rel_err(y, sparse_linear_reference(x.float(), w.float(), b.float(), t))
        record.update(capture_ok=err < 4e-3, capture_max_rel_err=err)
    except Exception as e:  # noqa: BLE001
        record.update(capture_ok=False, capture_error=f"{type(e).__name__}: {e}")
    return record


def _large_offsets_check() -> dict:
    """An lm_head-like weight with more than 2^31 elements: rows past the 2^31st element are read right."""
    import torch

    from wisparse_compile.kernels import sparse_gemv

    n, k = 262_144, 8_320  # 2.18e9 elements, 4.4 GB in bf16
    try:
        w = torch.empty(k, n, device="cuda", dtype=torch.bfloat16)  # input-major storage: w.t() is [n, k]
        w.zero_()
        w[-1].fill_(1.0)  # only the last channel's row (offset (k-1)*n > 2^31) is non-zero
        x = torch.zeros(1, k, device="cuda", dtype=torch.bfloat16)
        x[0, -1] = 2.0
        t = torch.full((k,), 0.5, device="cuda")
        out = sparse_gemv(x, w.t(), None, t)
        ok = bool((out == 2.0).all().item())
        del w
        torch.cuda.empty_cache()
        return {"large_offsets_ok": ok, "large_offsets_elements": n * k}
    except Exception as e:  # noqa: BLE001
        return {"large_offsets_ok": False, "large_offsets_error": f"{type(e).__name__}: {e}"}


class _RecordCounter:
    """Counts CUDA-graph recordings (cudagraph trees' ``record_function``)."""

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self):
        from torch._inductor import cudagraph_trees

        self._mgr = cudagraph_trees.CUDAGraphTreeManager
        self._orig = self._mgr.record_function
        counter = self

        def record_function(mgr, *args, **kwargs):
            counter.count += 1
            return counter._orig(mgr, *args, **kwargs)

        self._mgr.record_function = record_function
        return self

    def __exit__(self, *exc) -> None:
        self._mgr.record_function = self._orig


def step_tiny_decode(dry: bool, out: Path) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    from torch._dynamo.utils import counters

    import wisparse_compile as wsc
    from wisparse_compile.model_io import cache_keyword

    device = "cpu" if dry else "cuda"
    torch.manual_seed(0)
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1) if dry else \
        dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2)
    config = LlamaConfig(**size, num_attention_heads=8, num_key_value_heads=4, vocab_size=512, max_position_embeddings=128)
    model = LlamaForCausalLM(config).to(device).eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 512, (2, 64), generator=g).to(device) for _ in range(2)]
    plans = [wsc.calibrate(model, calib, wsc.SparsityConfig(sparsity=s, method="teal", allocation=wsc.Uniform())) for s in (0.5, 0.3)]
    prompt = torch.randint(0, 512, (1, 8), generator=g).to(device)
    new_tokens = 8 if dry else 24

    cache_name = cache_keyword(model)  # ``cache`` or ``past_key_values``: what its forward declares

    def greedy(step) -> list[int]:
        cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new_tokens + 1)
        with torch.no_grad(), wsc.masked_linears():  # the prefill: eager, masked
            logits = model(input_ids=prompt, use_cache=True, cache_position=torch.arange(prompt.shape[1], device=device),
                           **{cache_name: cache}).logits
        token, tokens = logits[:, -1:].argmax(-1), []
        with torch.no_grad():
            for i in range(new_tokens):
                pos = torch.tensor([prompt.shape[1] + i], device=device)
                logits = step(input_ids=token, use_cache=True, cache_position=pos, position_ids=pos[None],
                              **{cache_name: cache}).logits
                token = logits[:, -1:].argmax(-1).clone()
                tokens.append(int(token))
        return tokens

    def reference(**kwargs):
        with wsc.masked_linears():
            return model(**kwargs)

    record: dict = {"mode": "default" if dry else "reduce-overhead", "new_tokens": new_tokens}
    wsc.attach(model, plans[0])
    ref = greedy(reference)
    torch._dynamo.reset()
    t0 = time.perf_counter()
    compiled = torch.compile(model, backend="wisparse", mode=None if dry else "reduce-overhead")
    with _RecordCounter() as records:
        tokens = greedy(compiled)
        record["compile_and_decode_s"] = time.perf_counter() - t0
        record["tokens_match"] = tokens == ref
        record["tokens"], record["reference_tokens"] = tokens, ref
        first_records, graphs = records.count, counters["stats"]["unique_graphs"]
        tokens_again = greedy(compiled)
        record["rerecords_on_second_run"] = records.count - first_records
        wsc.attach(model, plans[1])  # plan swap on the captured model
        swapped = greedy(compiled)
        record["plan_swap_recompiles"] = counters["stats"]["unique_graphs"] - graphs
        record["plan_swap_rerecords"] = records.count - first_records
        swap_ref = greedy(reference)
    record["cudagraph_recordings"] = first_records
    record["repeat_tokens_match"] = tokens_again == tokens
    record["plan_swap_tokens_match"] = swapped == swap_ref
    record["graphs_compiled"] = graphs
    record["cudagraph_skips"] = dict(counters["inductor"]).get("cudagraph_skips", 0)
    # compile cost: the same decode step through plain Inductor (dense; a GPU figure, skipped in a
    # dry run, where the sparse side's time is mostly the C++ kernel's first build), and the configs
    # our GEMV autotunes over
    if not dry:
        wsc.detach(model)
        torch._dynamo.reset()
        t0 = time.perf_counter()
        greedy(torch.compile(model, mode="reduce-overhead"))
        record["dense_compile_and_decode_s"] = time.perf_counter() - t0
    from wisparse_compile.kernels.triton_sparse_gemv import gemv_configs

    # q/o, k/v, gate/up, down at batch 1: what a GPU autotunes per (M, N, K) key (the old grid: 162 each)
    record["gemv_configs_per_shape_tiny_llama"] = {
        f"{n}x{k}": len(gemv_configs(1, n, k)) for n, k in ((256, 256), (128, 256), (768, 256), (256, 768))
    }
    record["ok"] = bool(record["tokens_match"] and record["repeat_tokens_match"] and record["plan_swap_tokens_match"]
                        and record["plan_swap_recompiles"] == 0 and record["plan_swap_rerecords"] == 0
                        and record["rerecords_on_second_run"] == 0)
    return record


def step_kernel_bench(dry: bool, out: Path) -> dict:
    from benchmarks import kernel_bench

    shapes = "96x64" if dry else "4096x14336,14336x4096"
    args = ["--shapes", shapes, "--dtypes", "bfloat16", "--batches", "1,4", "--sparsities", "0,0.5,0.7", "--out-dir", str(out)]
    result = kernel_bench.main(args + (["--dry-run"] if dry else []))
    points = {(r["shape"][0], r["shape"][1], r["batch"], r["sparsity"]): r["speedup"] for r in result["records"]}
    at = lambda s: [v for (n, k, b, sp), v in points.items() if b == 1 and sp == s]  # noqa: E731
    int8 = _int8_speed(dry)
    model = _measured_vs_modelled(result["records"])
    for row in model:
        print(f"model: {row['shape'][0]}x{row['shape'][1]} batch {row['batch']} sparsity {row['sparsity']}: measured "
              f"{row['measured_us']} us, modelled {row['modelled_us']} us ({row['measured_over_modelled']}x)", flush=True)
    return {"result": result["path"], "records": len(result["records"]), "smoke": result["smoke"],
            "int8_kernel": int8, "measured_vs_modelled": model,
            "measured_over_modelled": [row["measured_over_modelled"] for row in model],
            "speedup_50pct_batch1": at(0.5), "speedup_0pct_batch1": at(0.0),
            "int8_speedup_0pct_batch1": [r["speedup"] for r in int8 if r["sparsity"] == 0.0],
            "int8_speedup_50pct_batch1": [r["speedup"] for r in int8 if r["sparsity"] == 0.5], "ok": True}


def _measured_vs_modelled(records: list[dict]) -> list[dict]:
    """benchmarks/gpu_model.py's time for each measured point, next to the measurement. The model
    compiles the kernels for the device's target, which the Triton interpreter cannot: it runs in a
    process of its own without TRITON_INTERPRET (in a dry run too, for an sm_90 profile)."""
    import torch

    name = torch.cuda.get_device_properties(0).name if torch.cuda.is_available() else "H100 (dry run)"
    sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132
    code = ("import json, sys; from benchmarks import gpu_model; "
            "print(json.dumps(gpu_model.modelled_points(json.loads(sys.stdin.read()), sys.argv[1], int(sys.argv[2]))))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", code, name, str(sms)], input=json.dumps(records), env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"gpu_model failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _int8_speed(dry: bool) -> list[dict]:
    """The int8 op (compiled; the interpreter's direct call in a dry run) vs bf16 ``F.linear``, batch 1."""
    import torch
    import torch.nn.functional as F

    from wisparse_compile.kernels import sparse_gemv_int8
    from wisparse_compile.quant.primitives import quantize_int8

    device = "cpu" if dry else "cuda"
    shapes = [(96, 64)] if dry else [(4096, 14336), (14336, 4096)]
    if dry:
        def timer(fn):
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    else:
        import triton.testing

        timer = lambda fn: triton.testing.do_bench(fn, return_mode="median")  # noqa: E731
        op = torch.compile(lambda x, q, s, t: torch.ops.wisparse.sparse_linear(x, q, None, t, 8, "int8", s), dynamic=False)
    records = []
    for n, k in shapes:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(n, k, generator=g) / k**0.5
        q, s = (v.to(device) for v in quantize_int8(w))
        wb = w.to(device, torch.bfloat16)
        x = torch.randn(1, k, generator=g).to(device, torch.bfloat16)
        dense_ms = timer(lambda: F.linear(x, wb))
        for sparsity in (0.0, 0.5):
            t = torch.full((k,), 0.6745 if sparsity else 0.0, device=device)
            if dry:
                int8_ms = timer(lambda t=t: sparse_gemv_int8(x, q, s, None, t))
            else:
                int8_ms = timer(lambda t=t: op(x, q, s, t))
            rows = (x.float().abs() > t).float().mean().item()
            records.append({"shape": [n, k], "sparsity": sparsity, "rows_loaded": rows, "dense_bf16_ms": dense_ms,
                            "int8_ms": int8_ms, "speedup": dense_ms / int8_ms,
                            "int8_gbps": (rows * n * k + 4 * n + 2 * (n + k)) / int8_ms / 1e6})
    return records


def step_decode_bench(dry: bool, out: Path) -> dict:
    from benchmarks import decode_bench

    args = ["--sparsities", "0,0.5", "--new-tokens", "96", "--rounds", "3", "--out-dir", str(out)]
    if dry:
        args = ["--dry-run", "--out-dir", str(out)]
    result = decode_bench.main(args)
    return {"result": result["path"], "records": result["records"], "smoke": result["smoke"],
            "speedup_50pct": [r["speedup"] for r in result["records"] if r["sparsity"] == 0.5], "ok": True}


STEP_FUNCTIONS: dict[str, Callable[[bool, Path], dict]] = {
    "env": step_env, "kernel_tests": step_kernel_tests, "tiny_decode": step_tiny_decode,
    "kernel_bench": step_kernel_bench, "decode_bench": step_decode_bench,
}


# ------------------------------------------------------------------------------------- the driver


def run_step(name: str, dry: bool, out: Path, record_file: Path) -> None:
    """Run one step in this process and write its record (or its error) to ``record_file`` for the driver."""
    t0 = time.perf_counter()
    try:
        record = STEP_FUNCTIONS[name](dry, out)
    except Exception as e:  # noqa: BLE001  (the record says what failed; the driver goes on)
        record = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    record["seconds"] = time.perf_counter() - t0
    atomic_write_json(record_file, record)


def targets(records: dict) -> dict:
    """Each target: the measured value(s) and whether it is met (None where not measured)."""
    kb, db = records.get("kernel_bench", {}), records.get("decode_bench", {})
    measured = {
        "kernel_vs_cublas_50pct_batch1": kb.get("speedup_50pct_batch1"),
        "kernel_vs_cublas_0pct_batch1": kb.get("speedup_0pct_batch1"),
        "decode_vs_dense_compile_50pct": db.get("speedup_50pct"),
    }
    return {name: {"target": TARGETS[name], "measured": values,
                   "met": (min(values) >= TARGETS[name]) if values else None}
            for name, values in measured.items()}


def markdown(summary: dict) -> str:
    lines = []
    if summary["dry_run"]:
        lines += ["**DRY RUN (CPU, Triton interpreter, tiny shapes): proves the script; NOT speed figures**", ""]
    env = summary["steps"].get("env", {})
    lines += [f"Device: {env.get('device', '?')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
              f"transformers {env.get('transformers', '?')}", "",
              "| step | ok | seconds | notes |", "|---|---|---|---|"]
    for name in summary["order"]:
        r = summary["steps"].get(name, {})
        notes = r.get("error") or ""
        if name == "kernel_tests" and "total" in r:
            notes = f"{r['passed']}/{r['total']} cases" + (f"; failed: {', '.join(r['failures'][:4])}" if r["failures"] else "")
        if name == "kernel_bench" and r.get("int8_speedup_0pct_batch1"):
            notes = ("int8 op vs bf16 cuBLAS, batch 1: 0% " + ", ".join(f"{v:.2f}x" for v in r["int8_speedup_0pct_batch1"])
                     + "; 50% " + ", ".join(f"{v:.2f}x" for v in r["int8_speedup_50pct_batch1"]))
        if name == "tiny_decode" and "tokens_match" in r:
            notes = (f"tokens match: {r['tokens_match']}, CUDA-graph recordings {r['cudagraph_recordings']}, "
                     f"re-records {r['rerecords_on_second_run']}, plan swap: {r['plan_swap_recompiles']} recompiles, "
                     f"{r['plan_swap_rerecords']} re-records, tokens match {r['plan_swap_tokens_match']}")
        lines.append(f"| {name} | {'yes' if r.get('ok') else 'NO'} | {r.get('seconds', 0):.0f} | {notes} |")
    lines += ["", "| target | needed | measured | met |", "|---|---|---|---|"]
    for name, t in summary["targets"].items():
        values = ", ".join(f"{v:.2f}x" for v in t["measured"]) if t["measured"] else "-"
        met = {True: "yes", False: "NO", None: "not measured"}[t["met"]]
        lines.append(f"| {name} | >= {t['target']}x | {values} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes: proves the script")
    parser.add_argument("--steps", default=",".join(STEPS), help="which steps: " + ", ".join(STEPS))
    parser.add_argument("--out-dir", default=None, help="default benchmarks/results (--dry-run: a temporary folder)")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)  # internal: run one step in this process
    parser.add_argument("--record", default=None, help=argparse.SUPPRESS)  # internal: where that step's record goes
    args = parser.parse_args(argv)
    out = out_dir_for(args.out_dir, args.dry_run, "gpu_check")
    if args.step:
        run_step(args.step, args.dry_run, out, Path(args.record))
        return {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    order = [s for s in args.steps.split(",") if s]
    steps: dict[str, dict] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="wisparse-gpu-check-steps-") as records_dir:
        for name in order:
            timeout = STEP_TIMEOUTS[name][1 if args.dry_run else 0]
            if not args.dry_run:
                timeout = int(min(timeout, BUDGET_S - (time.perf_counter() - started)))
                if timeout < 10:
                    steps[name] = {"ok": False, "error": f"skipped: the {BUDGET_S} s budget is spent"}
                    continue
            record_file = Path(records_dir) / f"{name}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--record", str(record_file),
                   "--out-dir", str(out)] + (["--dry-run"] if args.dry_run else [])
            t0 = time.perf_counter()
            print(f"[gpu_check] {name} (timeout {timeout} s) ...", flush=True)
            try:
                done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
                if record_file.exists():
                    steps[name] = json.loads(record_file.read_text())
                else:
                    steps[name] = {"ok": False, "error": f"exit {done.returncode}, no record", "stderr": done.stderr[-4000:]}
            except subprocess.TimeoutExpired:
                steps[name] = {"ok": False, "error": f"timed out after {timeout} s"}
            steps[name].setdefault("seconds", time.perf_counter() - t0)
            print(f"[gpu_check] {name}: {'ok' if steps[name].get('ok') else 'FAILED ' + str(steps[name].get('error', ''))[:300]}",
                  flush=True)
    summary = {"dry_run": args.dry_run, "order": order, "steps": steps, "targets": targets(steps),
               "ok": all(s.get("ok") for s in steps.values())}
    table = markdown(summary)
    print(table)
    records = ([{"kind": "step", "step": name, **steps[name]} for name in order if name in steps]
               + [{"kind": "target", "name": name, "needed": t["target"], "measured": t["measured"], "met": t["met"]}
                  for name, t in summary["targets"].items()])
    setup = {"steps": order, "budget_s": BUDGET_S, "step_timeouts_s": {n: STEP_TIMEOUTS[n][args.dry_run] for n in order},
             "targets": TARGETS}
    result = write_result("gpu_check", setup, records, table, out_dir=out, device="cpu" if args.dry_run else "cuda",
                          dry_run=args.dry_run)
    return {**result, **summary}


if __name__ == "__main__":
    sys.exit(0 if main().get("ok", True) else 1)
