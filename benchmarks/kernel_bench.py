"""GPU benchmark of the sparse GEMV: sparse vs dense (cuBLAS ``F.linear`` and Inductor's dense).

    PYTHONPATH=$PWD python benchmarks/kernel_bench.py                      # on a CUDA machine: the full grid
    PYTHONPATH=$PWD python benchmarks/kernel_bench.py --dry-run            # anywhere: tiny shapes, Triton interpreter

Grid: Llama-3-8B shapes (4096x4096, 14336x4096, 4096x14336) and SmolLM2-135M shapes, sparsity
0..0.9, batch 1/2/4/8, bf16 and fp16. Each point times, in one run with ``triton.testing.do_bench``:
dense ``F.linear`` on the usual [out, in] weight (cuBLAS), ``torch.compile`` of the same
(Inductor's dense), and ``torch.compile`` of ``wisparse::sparse_linear`` on the input-major weight
(Inductor inlines the Triton kernel). Thresholds are one constant per channel at the sparsity
quantile of |x| (x ~ N(0, 1)), so each token row keeps about (1 - s) of the channels and a batch of
b rows loads the union (recorded as ``rows_loaded``). Achieved bandwidth counts the weight rows
loaded plus x and the output, against the GPU's peak (``--peak-gbps`` or a table of known GPUs).

Writes ``benchmarks/results/kernel_gpu/<gpu>/<date>.json`` (``harness.write_result``; ``setup`` holds the
grid and the peak) and the markdown table beside it.

    PYTHONPATH=$PWD python benchmarks/kernel_bench.py --cpu [--quick]    # the C++ CPU kernels, GB/s vs a read loop

``--cpu``: the C++ sparse GEMV (``wisparse_cpu::sparse_gemv``, fp32 weights) and its int8 variant
(``sparse_gemv_int8``) at sparsity 0 and 0.5, batch 1, on Llama-3-8B shapes and SmolLM2's output head
(49152x576). Achieved GB/s (weight bytes of the kept rows + scales + x + out, per call) stands next to
this machine's streaming bandwidth, measured in the same run by a read loop (``torch.sum`` over a
256 MiB fp32 buffer, the same threads), and the records interleave the read loop with the kernels
round by round, so load from other processes hits both alike. Each call takes the next of several
weight copies (together >= 256 MiB), so weights come from DRAM. Target: >= 80% of the read loop on
the large shapes. The fp32 kernel, streaming several rows at once, can beat the one-stream read loop,
so each record also gives its GB/s as a fraction of the fp32 kernel's at the same point. Writes
``results/kernel_cpu/<machine>/<date>[-<variant>].json`` and ``.md``; ``--quick`` (small shapes, 2 rounds,
a temporary folder) only checks that the script works. ``--dry-run`` (``--smoke``; and any machine
without CUDA) runs small shapes on the CPU through the Triton interpreter, into a temporary folder unless
``--out-dir`` says otherwise: the numbers prove the script works and are NOT speed figures.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import sys
import time

import torch

from benchmarks.harness import (
    device_description, interleaved, load_average, out_dir_for, summary, time_ms, write_result,
)

SHAPES = {  # [out, in]
    "Llama-3-8B": [(4096, 4096), (14336, 4096), (4096, 14336)],
    "SmolLM2-135M": [(576, 576), (1536, 576), (576, 1536), (192, 576)],
}
SMOKE_SHAPES = {"smoke": [(96, 64), (48, 128)]}
SPARSITIES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
BATCHES = (1, 2, 4, 8)
#: Peak HBM bandwidth in GB/s by device-name pattern (vendor data sheets).
PEAK_GBPS = {r"H200": 4800.0, r"H100.*PCIe": 2000.0, r"H100": 3350.0, r"A100.*80": 2039.0, r"A100": 1555.0, r"L40S": 864.0}
SMOKE_WARNING = "SMOKE RUN (CPU / Triton interpreter): these numbers are NOT speed figures"

log = logging.getLogger("kernel_bench")


def peak_gbps(override: float | None) -> float | None:
    if override is not None or not torch.cuda.is_available():
        return override
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_GBPS.items() if re.search(k, name)), None)


def _timer(smoke: bool):
    """``triton.testing.do_bench`` on a GPU (ms, median); wall-clock median of a few calls in smoke mode."""
    if not smoke:
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, return_mode="median")

    def wall(fn) -> float:
        fn()
        samples = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return sorted(samples)[1]

    return wall


def _dense_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, w)


def _sparse_linear(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.ops.wisparse.sparse_linear(x, w, None, t, 8)


_COMPILED: list = []


def _compiled():
    """Inductor's dense and the sparse op, compiled once with static shapes (one graph per shape:
    dynamic shapes would make the row count symbolic and route the op to its dense path)."""
    if not _COMPILED:
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, 4096)
        if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
            torch._dynamo.config.accumulated_recompile_limit = 4096
        _COMPILED.extend([torch.compile(_dense_linear, dynamic=False), torch.compile(_sparse_linear, dynamic=False)])
    return _COMPILED


def bench_point(out_f: int, in_f: int, dtype: torch.dtype, batch: int, sparsity: float, device: str, smoke: bool, timer) -> dict:
    """Time dense cuBLAS, Inductor dense and the sparse op at one (shape, dtype, batch, sparsity)."""
    import torch.nn.functional as F

    from wisparse_compile.kernels import sparse_gemv

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, in_f, generator=g, device=device).to(dtype)
    w = (torch.randn(out_f, in_f, generator=g, device=device) / in_f**0.5).to(dtype)
    w_input_major = w.t().contiguous().t()
    level = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + sparsity / 2)).item() if sparsity > 0 else 0.0
    t = torch.full((in_f,), level, device=device)
    keep = x.abs().float() > t
    rows_loaded = keep.any(0).float().mean().item()

    dense = lambda: F.linear(x, w)  # noqa: E731
    if smoke:  # the interpreter cannot run inside compiled code on CPU: call the kernel directly
        sparse = lambda: sparse_gemv(x, w_input_major, None, t)  # noqa: E731
        inductor_ms = None
    else:
        inductor, sparse_c = _compiled()
        sparse = lambda: sparse_c(x, w_input_major, t)  # noqa: E731
        inductor_ms = timer(lambda: inductor(x, w))
    dense_ms = timer(dense)
    sparse_ms = timer(sparse)
    ref = torch.where(keep, x, torch.zeros((), dtype=dtype, device=device)).float() @ w.float().t()
    err = (sparse().float() - ref).abs().max().item()
    item = torch.finfo(dtype).bits // 8
    moved = (rows_loaded * out_f * in_f + batch * (in_f + out_f)) * item
    return {
        "shape": [out_f, in_f], "dtype": str(dtype).removeprefix("torch."), "batch": batch, "sparsity": sparsity,
        "dense_ms": dense_ms, "inductor_dense_ms": inductor_ms, "sparse_ms": sparse_ms,
        "speedup": dense_ms / sparse_ms,
        "speedup_vs_inductor": inductor_ms / sparse_ms if inductor_ms else None,
        "rows_loaded": rows_loaded, "sparse_gbps": moved / sparse_ms / 1e6,
        "dense_gbps": (out_f * in_f + batch * (in_f + out_f)) * item / dense_ms / 1e6,
        "max_abs_err": err,
    }


def markdown(records: list[dict], device: str, peak: float | None, smoke: bool) -> str:
    lines = [f"**{SMOKE_WARNING}**", ""] if smoke else []
    lines += [
        f"Device: {device}, torch {torch.__version__}, peak {peak or '?'} GB/s",
        "",
        "| shape [out,in] | dtype | batch | sparsity | rows loaded | cuBLAS ms | Inductor ms | sparse ms | vs cuBLAS | vs Inductor | sparse GB/s (% peak) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        ind = f"{r['inductor_dense_ms']:.4f}" if r["inductor_dense_ms"] else "-"
        vs_ind = f"{r['speedup_vs_inductor']:.2f}x" if r["speedup_vs_inductor"] else "-"
        pct = f" ({100 * r['sparse_gbps'] / peak:.0f}%)" if peak else ""
        lines.append(
            f"| {r['shape'][0]}x{r['shape'][1]} | {r['dtype']} | {r['batch']} | {r['sparsity']:.1f} | {r['rows_loaded']:.2f} "
            f"| {r['dense_ms']:.4f} | {ind} | {r['sparse_ms']:.4f} | {r['speedup']:.2f}x | {vs_ind} | {r['sparse_gbps']:.0f}{pct} |"
        )
    return "\n".join(lines)


CPU_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (49152, 576)]
CPU_QUICK_SHAPES = [(96, 64), (48, 128)]
CPU_COLD_BYTES = 256 << 20


def cpu_bench(shapes: list[tuple[int, int]], rounds: int, cold_bytes: int = CPU_COLD_BYTES, read_bytes: int = 256 << 20) -> list[dict]:
    """Records: GB/s of the C++ kernels (fp32, int8) at sparsity 0 and 0.5 next to a streaming read loop."""
    from wisparse_compile.kernels import cpu_kernel_available
    from wisparse_compile.quant.primitives import quantize_int8

    if not cpu_kernel_available():
        raise SystemExit("the C++ CPU kernel did not build; see the warning above")
    buffer = torch.ones(read_bytes // 4)
    read = lambda: buffer.sum()  # noqa: E731
    read()
    records = []
    for n, k in shapes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, k, generator=g)
        for wdtype in ("float32", "int8"):
            item = 4 if wdtype == "float32" else 1
            copies = max(1, -(-cold_bytes // (n * k * item)))
            weights = []
            for _ in range(copies):
                w = torch.randn(n, k, generator=g) / k**0.5
                weights.append(w.t().contiguous() if wdtype == "float32" else quantize_int8(w))
            for sparsity in (0.0, 0.5):
                t = torch.full((k,), torch.quantile(x.abs(), sparsity).item() if sparsity else 0.0)
                rows = (x.abs() > t).float().mean().item()
                turn = [0]

                def call(weights=weights, t=t, wdtype=wdtype):
                    w = weights[turn[0] % len(weights)]
                    turn[0] += 1
                    if wdtype == "float32":
                        return torch.ops.wisparse_cpu.sparse_gemv(x, w, None, t)
                    return torch.ops.wisparse_cpu.sparse_gemv_int8(x, w[0], w[1], None, t)

                inner = max(len(weights), -(-int(64e6 // (n * k * item * rows)) // len(weights)) * len(weights))
                call()
                samples = interleaved({"read": lambda: time_ms(read, 2), "kernel": lambda: time_ms(call, inner)}, rounds)
                moved = rows * n * k * item + (4 * n if wdtype == "int8" else 0) + 4 * (k + n)
                kernel, read_ms = summary(samples["kernel"]), statistics.median(samples["read"])
                gbps, read_gbps = moved / kernel["median"] / 1e6, buffer.numel() * 4 / read_ms / 1e6
                records.append({
                    "shape": [n, k], "weights": wdtype, "batch": 1, "sparsity": sparsity, "rows_loaded": rows,
                    "kernel_ms": kernel["median"], "kernel_ms_range": [kernel["min"], kernel["max"]],
                    "gbps": gbps, "read_loop_gbps": read_gbps, "fraction_of_read_loop": gbps / read_gbps,
                })
    fp32_gbps = {(tuple(r["shape"]), r["sparsity"]): r["gbps"] for r in records if r["weights"] == "float32"}
    for r in records:  # the fp32 kernel streams several rows at once and can beat the one-stream read loop
        r["fraction_of_fp32_kernel"] = r["gbps"] / fp32_gbps[(tuple(r["shape"]), r["sparsity"])]
    return records


def cpu_markdown(records: list[dict], device: str, load: list[float] | None) -> str:
    lines = [
        f"Device: {device}, load average {load}",
        "",
        "| shape [out,in] | weights | sparsity | rows loaded | kernel ms (range) | GB/s | read loop GB/s | % of read loop | % of fp32 kernel GB/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lo, hi = r["kernel_ms_range"]
        lines.append(
            f"| {r['shape'][0]}x{r['shape'][1]} | {r['weights']} | {r['sparsity']:.1f} | {r['rows_loaded']:.2f} | "
            f"{r['kernel_ms']:.3f} ({lo:.3f}-{hi:.3f}) | {r['gbps']:.1f} | {r['read_loop_gbps']:.1f} | "
            f"{100 * r['fraction_of_read_loop']:.0f}% | {100 * r['fraction_of_fp32_kernel']:.0f}% |"
        )
    return "\n".join(lines)


def main_cpu(args: argparse.Namespace) -> dict:
    load = load_average()
    if args.quick:
        records = cpu_bench(CPU_QUICK_SHAPES, rounds=2, cold_bytes=1 << 20, read_bytes=4 << 20)
    else:
        records = cpu_bench(CPU_SHAPES, rounds=args.rounds)
    load = [load, load_average()]
    table = cpu_markdown(records, device_description(), load)
    print(table)
    setup = {"shapes": CPU_QUICK_SHAPES if args.quick else CPU_SHAPES, "rounds": 2 if args.quick else args.rounds,
             "read_loop": "torch.sum over a 256 MiB fp32 buffer, interleaved with the kernels round by round"}
    return write_result("kernel_cpu", setup, records, table, out_dir=out_dir_for(args.out_dir, args.quick, "kernel_cpu"),
                        variant=args.variant, dry_run=args.quick, load=load)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the C++ CPU kernels (fp32, int8): GB/s vs a read loop")
    parser.add_argument("--quick", action="store_true", help="with --cpu: tiny shapes, 2 rounds (checks the script)")
    parser.add_argument("--rounds", type=int, default=7, help="with --cpu: interleaved rounds")
    parser.add_argument("--dry-run", "--smoke", dest="smoke", action="store_true",
                        help="tiny shapes on CPU (Triton interpreter); not speed figures")
    parser.add_argument("--dtypes", default=None, help="default bfloat16,float16 (dry run: float32,bfloat16)")
    parser.add_argument("--batches", default=None, help=f"default {','.join(map(str, BATCHES))} (dry run: 1,2)")
    parser.add_argument("--sparsities", default=None, help=f"default {','.join(map(str, SPARSITIES))} (dry run: 0,0.5)")
    parser.add_argument("--models", default=",".join(SHAPES), help="which shape sets: " + ", ".join(SHAPES))
    parser.add_argument("--shapes", default=None, help="explicit [out]x[in] shapes instead of --models, e.g. 4096x14336,14336x4096")
    parser.add_argument("--peak-gbps", type=float, default=None)
    parser.add_argument("--variant", default=None, help="a suffix of the result file's name (e.g. 1thread)")
    parser.add_argument("--out-dir", default=None, help="default benchmarks/results (dry run, --quick: a temporary folder)")
    args = parser.parse_args(argv)
    if args.cpu:
        return main_cpu(args)
    smoke = args.smoke or not torch.cuda.is_available()
    if smoke:
        if os.environ.get("TRITON_INTERPRET") != "1" and "wisparse_compile" in sys.modules:
            raise SystemExit("--dry-run needs TRITON_INTERPRET=1 before wisparse_compile is imported")
        os.environ["TRITON_INTERPRET"] = "1"
        log.warning(SMOKE_WARNING)
        shapes = SMOKE_SHAPES
        defaults = ("float32,bfloat16", "1,2", "0,0.5")
    else:
        shapes = {m: SHAPES[m] for m in args.models.split(",")}
        defaults = ("bfloat16,float16", ",".join(map(str, BATCHES)), ",".join(map(str, SPARSITIES)))
    if args.shapes:
        shapes = {"given": [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]}
    dtypes = [getattr(torch, d) for d in (args.dtypes or defaults[0]).split(",")]
    batches = [int(b) for b in (args.batches or defaults[1]).split(",")]
    sparsities = [float(s) for s in (args.sparsities or defaults[2]).split(",")]
    from tqdm import tqdm

    device = "cpu" if smoke else "cuda"
    timer = _timer(smoke)
    points = [(s, d, b, sp) for m in shapes.values() for s in m for d in dtypes for b in batches for sp in sparsities]
    records = [bench_point(*s, d, b, sp, device, smoke, timer) for s, d, b, sp in tqdm(points, desc="kernel bench")]
    peak = peak_gbps(args.peak_gbps)
    table = markdown(records, "cpu (Triton interpreter)" if smoke else device_description(device), peak, smoke)
    print(table)
    setup = {"shapes": shapes, "dtypes": [str(d).removeprefix("torch.") for d in dtypes], "batches": batches,
             "sparsities": sparsities, "peak_gbps": peak, "timer": "wall clock" if smoke else "triton.testing.do_bench"}
    result = write_result("kernel_gpu", setup, records, table, out_dir=out_dir_for(args.out_dir, smoke, "kernel_gpu"),
                          device=device, dry_run=smoke)
    return {**result, "smoke": smoke}  # ``smoke``: what benchmarks/gpu_check.py reads


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
