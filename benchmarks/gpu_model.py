"""A bandwidth model of the Triton sparse GEMVs, per config, from their compiled code: no GPU needed.

    python benchmarks/gpu_model.py             # compiles for sm_80/sm_90 (~1-2 min), prints the table
    python benchmarks/gpu_model.py --dry-run   # one shape, one GPU: proves the script

For each GPU profile, GEMV shape, dtype, token rows, sparsity and autotune config (the configs the
autotuner may keep, with the K split the host picks), from the kernel compiled for that GPU's
target (``wisparse_compile/kernels/triton_aot.py``: registers, shared memory):

- bytes each launch must move: kept rows x row bytes, rounded up to 32-byte sectors per program
  row (the padding a padded row carries included), + x + thresholds + per-column scales, + the fp32
  workspace planes of a split K (written, then read back by the sum: counted as DRAM traffic,
  though most of it stays in L2), + the output. Kept rows of M tokens: the union of their masks,
  taken as independent (1 - s^M of the channels);
- occupancy: CTAs per SM from registers (allocated in 8s per thread), shared memory, warps (64 per
  SM) and the 32-CTA limit, and from the grid (a grid smaller than the GPU holds fewer);
- bytes in flight per SM: resident threads x BLOCK_K 16-byte row vectors x the kept fraction (a
  pruned row's load is masked off: nothing in flight for it);
- Little's law: achieved bandwidth = min(peak, SMs x bytes in flight / latency), where latency is
  the loaded DRAM latency (``LATENCY_NS``, an assumption: ~600-800 ns is what HBM2e/HBM3 GPUs
  show under load), then a wave-quantization factor for the last partial wave of CTAs;
- the predicted fraction of peak HBM bandwidth, the time, and the speed-up over a dense GEMV
  moving the whole weight at ``DENSE_FRACTION`` of peak (what a good cuBLAS GEMV reaches).

Ranked by predicted fraction. It is a model: ``gpu_check.py`` measures the same launches on a GPU
and prints measured next to modelled, which confirms or refutes it. Writes
``benchmarks/results/gpu_model/modelled/<date>.json`` and ``.md`` (the harness's layout; ``--out-dir``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

#: Loaded HBM latency assumed by Little's law (ns).
LATENCY_NS = 700.0
#: Fraction of peak bandwidth a dense cuBLAS GEMV reaches at batch 1 (the speed-up's baseline).
DENSE_FRACTION = 0.9
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
SECTOR = 32


@dataclass(frozen=True)
class Gpu:
    name: str
    cc: int
    sms: int
    peak_tb_s: float
    shared_kb_per_sm: int


GPUS = (Gpu("A100-SXM 80GB", 80, 108, 2.04, 164), Gpu("H100-SXM", 90, 132, 3.35, 228), Gpu("H200", 90, 132, 4.8, 228))
#: (out, in) of the gpu_check shapes: Llama-3-8B's down (4096x14336), gate/up (14336x4096), q/o (4096x4096).
SHAPES = ((4096, 14336), (14336, 4096), (4096, 4096))


@dataclass(frozen=True)
class Prediction:
    gpu: str
    form: str
    dtype: str
    n: int
    k: int
    rows: int
    sparsity: float
    block_k: int
    num_warps: int
    split_k: int
    ctas: int
    registers: int
    ctas_per_sm: int
    occupancy: float  # resident warps / 64
    in_flight_kb_per_sm: float
    needed_kb_per_sm: float  # Little's law: peak x latency / SMs
    mb_moved: float
    fraction_of_peak: float
    time_us: float
    speedup_vs_dense: float


def predict(gpu: Gpu, form: str, dtype: torch.dtype, rows: int, n: int, k: int, sparsity: float) -> list[Prediction]:
    """One prediction per autotune config of this call (see the module docstring)."""
    from wisparse_compile.kernels import triton_aot

    call = triton_aot.call_of(triton_aot.Case(form, str(dtype).removeprefix("torch."), rows, n, k, padded=False))
    launches = triton_aot.recorded_launches(call)
    artefacts = triton_aot.compile_call(call, gpu.cc, launches)
    launch = launches[0]
    launches_per_call = len(launches)  # rows past ROWS_PER_LAUNCH run as several launches
    grid = launch.grid
    ctas = grid[0] * grid[1]
    split_k = grid[1]
    m = launch.args[triton_aot_index(launch, "M")]
    weight_bytes = {"int8": 1.0, "int4": 0.5}.get(form, torch.empty(0, dtype=dtype).element_size())
    act_bytes = torch.empty(0, dtype=dtype).element_size()
    kept = 1.0 - sparsity ** m
    out = []
    for a in artefacts:
        block_n = a.config["BLOCK_N"]
        row_bytes = block_n * (1 if form in ("int8", "int4") else act_bytes)
        sector_row = math.ceil(row_bytes / SECTOR) * SECTOR
        weight_moved = kept * k * grid[0] * sector_row + (kept * k * grid[0] * block_n // 16 * 4 if form == "int4" else 0)
        other = m * k * act_bytes + k * 4 + m * n * act_bytes + (n * 4 if form == "int8" else 0)
        workspace = 2 * split_k * m * n * 4 if split_k > 1 else 0
        moved = launches_per_call * (weight_moved + other + workspace)
        regs = math.ceil(max(a.registers, 1) / 8) * 8
        per_sm = min(REGISTERS_PER_SM // (regs * 32 * a.num_warps), MAX_WARPS_PER_SM // a.num_warps, MAX_CTAS_PER_SM,
                     (gpu.shared_kb_per_sm * 1024) // max(a.shared_bytes, 1))
        resident = min(per_sm, math.ceil(ctas / gpu.sms))
        vector = 16
        in_flight = resident * a.num_warps * 32 * a.config["BLOCK_K"] * vector * kept
        needed = gpu.peak_tb_s * 1e12 * LATENCY_NS * 1e-9 / gpu.sms
        waves = ctas / (gpu.sms * per_sm)
        wave_efficiency = waves / math.ceil(waves) if waves > 1 else 1.0
        fraction = min(1.0, in_flight / needed) * wave_efficiency
        time_us = moved / (gpu.peak_tb_s * 1e12 * fraction) * 1e6
        dense_us = (n * k * weight_bytes) / (gpu.peak_tb_s * 1e12 * DENSE_FRACTION) * 1e6
        out.append(Prediction(
            gpu.name, form, str(dtype).removeprefix("torch."), n, k, rows, sparsity, a.config["BLOCK_K"], a.num_warps,
            split_k, ctas, a.registers, per_sm, round(per_sm * a.num_warps / MAX_WARPS_PER_SM, 3),
            round(in_flight / 1024, 1), round(needed / 1024, 1), round(moved / 1e6, 2), round(fraction, 3),
            round(time_us, 2), round(dense_us / time_us, 2),
        ))
    return out


def triton_aot_index(launch, name: str) -> int:
    """Position of the kernel parameter ``name`` in a recorded launch's arguments."""
    fn = launch.kernel.fn if hasattr(launch.kernel, "configs") else launch.kernel
    return list(fn.arg_names).index(name)


def gpu_profile(device_name: str, sms: int) -> Gpu:
    """The profile of a device by name (H200, H100, A100), its SM count as measured; an unknown GPU
    gets the H100's bandwidth (said in its name)."""
    for gpu in GPUS:
        if gpu.name.split("-")[0].split()[0] in device_name:
            return dataclasses.replace(gpu, sms=sms)
    return dataclasses.replace(GPUS[1], name=f"{device_name} (H100 bandwidth assumed)", sms=sms)


def modelled_points(points: list[dict], device_name: str, sms: int) -> list[dict]:
    """For measured ``kernel_bench`` points (shape, batch, sparsity, sparse_ms), the model's time of
    the same call (its best config, as the autotuner would keep) and measured / modelled."""
    gpu = gpu_profile(device_name, sms)
    out = []
    for point in points:
        (n, k), rows, sparsity = point["shape"], point["batch"], point["sparsity"]
        best = max(predict(gpu, "float", getattr(torch, point["dtype"]), rows, n, k, sparsity),
                   key=lambda p: p.fraction_of_peak)
        measured_us = point["sparse_ms"] * 1e3
        out.append({"shape": [n, k], "batch": rows, "sparsity": sparsity, "gpu_profile": gpu.name,
                    "modelled_us": best.time_us, "measured_us": round(measured_us, 2),
                    "modelled_fraction_of_peak": best.fraction_of_peak,
                    "measured_over_modelled": round(measured_us / best.time_us, 2)})
    return out


def grid_of_cases(dry: bool):
    if dry:
        yield GPUS[1], "float", torch.bfloat16, 1, 256, 512, 0.5
        return
    for gpu in GPUS:
        for n, k in SHAPES:
            for rows in (1, 4):
                for sparsity in (0.0, 0.5):
                    yield gpu, "float", torch.bfloat16, rows, n, k, sparsity
            yield gpu, "int8", torch.bfloat16, 1, n, k, 0.5
            yield gpu, "int4", torch.bfloat16, 1, n, k, 0.5


def table(predictions: list[Prediction]) -> str:
    head = ("| GPU | form | N x K | rows | sparsity | BLOCK_K | warps | split | regs | CTAs/SM | occupancy | "
            "in flight KB/SM (needed) | MB moved | modelled % of peak | us | x dense |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in predictions:
        lines.append(f"| {p.gpu} | {p.form} {p.dtype} | {p.n}x{p.k} | {p.rows} | {p.sparsity:.0%} | {p.block_k} | "
                     f"{p.num_warps} | {p.split_k} | {p.registers} | {p.ctas_per_sm} | {p.occupancy:.0%} | "
                     f"{p.in_flight_kb_per_sm} ({p.needed_kb_per_sm}) | {p.mb_moved} | {p.fraction_of_peak:.0%} | "
                     f"{p.time_us} | {p.speedup_vs_dense} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Prediction]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="one small case: proves the script")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: benchmarks/results (a dry run: no files)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("gpu_model: unset TRITON_INTERPRET (the model reads compiled kernels)")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    predictions = [p for case in grid_of_cases(args.dry_run) for p in predict(*case)]
    predictions.sort(key=lambda p: (p.gpu, p.form, p.n, p.k, p.rows, p.sparsity, -p.fraction_of_peak))
    text = table(predictions)
    print(text)
    if not args.dry_run or args.out_dir is not None:
        from benchmarks.harness import RESULTS, write_result

        setup = {"latency_ns": LATENCY_NS, "dense_fraction": DENSE_FRACTION, "gpus": [dataclasses.asdict(g) for g in GPUS],
                 "shapes": [list(s) for s in SHAPES], "modelled": True}
        heading = (f"Modelled (not measured): Triton sparse GEMV bandwidth. Latency {LATENCY_NS:.0f} ns; the dense "
                   f"baseline reads the whole weight at {DENSE_FRACTION:.0%} of peak.\n\n")
        write_result("gpu_model", setup, [dataclasses.asdict(p) for p in predictions], heading + text,
                     out_dir=args.out_dir or RESULTS, machine="modelled", dry_run=args.dry_run,
                     note="a model of the compiled kernels; gpu_check.py measures the same launches")
    return predictions


if __name__ == "__main__":
    main()
