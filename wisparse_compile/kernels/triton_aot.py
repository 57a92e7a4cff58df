"""Compile the Triton sparse GEMVs for a CUDA target on a machine with no GPU, and read what came out.

Triton compiles for an explicit ``GPUTarget("cuda", cc, 32)`` without a driver; ptxas ships in the
triton wheel. So the suite can check, on every config the autotuner may pick, what a memory-bound
GEMV must be (tests/kernels/test_triton_aot.py) and the bandwidth model can read registers
(benchmarks/gpu_model.py):

- ``registers``/``local_bytes``/``shared_bytes``: from ``cuobjdump --dump-resource-usage`` of the
  cubin; ``local_bytes`` is its stack frame plus local memory, where spills go (a kernel that
  spills shows few registers and a stack: 0 means no spills);
- ``loop_layout_conversions``: ``ttg.convert_layout`` ops inside the K loop's ``scf.for`` in the
  TTGIR (each one a shared-memory round trip);
- ``barriers``, ``loop_barriers``, ``cp_async``, ``atomics``: ``bar.sync`` in the PTX, in its loops
  (LLVM marks each loop header), ``cp.async`` and atomic instructions;
- ``vector_loads``/``scalar_16bit_loads``/``scalar_8bit_loads``: ``ld.global`` of 16 bytes
  (``.v4.b32``) and of one 2- or 1-byte element.

Calls go through the host functions themselves (``sparse_gemv_triton`` and friends) with a
recording launcher, so the arguments, strides and constexprs are exactly those of a real launch;
the tensors may live on the CPU (only dtype, strides and 16-byte alignment matter). Needs
``TRITON_INTERPRET`` unset (under the interpreter ``@triton.jit`` gives no compilable function):
``python -m wisparse_compile.kernels.triton_aot`` prints one JSON line per compiled config of
the standard matrix (``standard_cases``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

_BARRIER = re.compile(r"\b(?:bar|barrier)\.sync\b")
#: Compute capabilities the suite compiles for: A100 (sm_80) and H100/H200 (sm_90).
TARGETS = (80, 90)


@dataclass(frozen=True)
class Artefact:
    """What one compiled config is made of (see the module docstring)."""

    cc: int
    config: dict[str, Any]
    num_warps: int
    num_stages: int
    registers: int
    local_bytes: int
    shared_bytes: int
    loop_layout_conversions: int
    barriers: int
    loop_barriers: int
    cp_async: int
    atomics: int
    vector_loads: int
    scalar_16bit_loads: int
    scalar_8bit_loads: int


@dataclass
class _Launch:
    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    """A ``launcher`` for the host functions: records each launch instead of running it."""

    def __init__(self) -> None:
        self.launches: list[_Launch] = []

    def __call__(self, kernel: Any) -> Any:
        recorder = self

        class _Indexed:
            def __getitem__(self, grid: tuple) -> Callable[..., None]:
                def record(*args: Any, **kwargs: Any) -> None:
                    recorder.launches.append(_Launch(kernel, grid, args, kwargs))
                return record

        return _Indexed()


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _resources(cubin: bytes) -> tuple[int, int, int]:
    """(registers, local bytes, shared bytes) of the cubin's one kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    registers, stack, shared, local = (int(v) for v in found.groups())
    return registers, stack + local, shared


def loop_body(ttgir: str) -> str:
    """The TTGIR text of the first ``scf.for`` (the K loop), braces matched."""
    start = ttgir.find("scf.for")
    if start < 0:
        return ""
    depth, i = 0, ttgir.index("{", start)
    for j in range(i, len(ttgir)):
        depth += {"{": 1, "}": -1}.get(ttgir[j], 0)
        if depth == 0:
            return ttgir[start:j + 1]
    return ttgir[start:]


def ptx_loops(ptx: str) -> list[str]:
    """The PTX of each loop: from an LLVM "Loop Header" label to the last branch back to it."""
    loops = []
    for found in re.finditer(r"^(\$L__BB\d+_\d+):[^\n]*Loop Header", ptx, flags=re.M):
        label = found.group(1)
        back = [m.end() for m in re.finditer(rf"bra(?:\.uni)?\s+{re.escape(label)};", ptx) if m.start() > found.end()]
        if back:
            loops.append(ptx[found.start():back[-1]])
    return loops


def compile_launch(launch: _Launch, cc: int) -> list[Artefact]:
    """AOT-compile a recorded launch for ``sm_{cc}``: every autotune config, or its one explicit config."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    configs = [(dict(c.kwargs), c.num_warps, c.num_stages) for c in kernel.configs] if hasattr(kernel, "configs") else [
        ({k: v for k, v in launch.kwargs.items() if k not in ("num_warps", "num_stages")},
         launch.kwargs.get("num_warps", 4), launch.kwargs.get("num_stages", 1))
    ]
    fn = kernel.fn if hasattr(kernel, "configs") else kernel
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    bind = create_function_from_signature(fn.signature, fn.params, backend)
    out = []
    for config, warps, stages in configs:
        kwargs = {**launch.kwargs, **config, "num_warps": warps, "num_stages": stages, "debug": False}
        bound, specialization, options = bind(*launch.args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
        registers, local, shared = _resources(compiled.asm["cubin"])
        out.append(Artefact(
            cc=cc, config=config, num_warps=warps, num_stages=stages, registers=registers, local_bytes=local,
            shared_bytes=shared, loop_layout_conversions=loop_body(ttgir).count("ttg.convert_layout"),
            barriers=len(_BARRIER.findall(ptx)), loop_barriers=sum(len(_BARRIER.findall(loop)) for loop in ptx_loops(ptx)), cp_async=ptx.count("cp.async.ca") + ptx.count("cp.async.cg"), atomics=len(re.findall(r"\batom\.|\bred\.", ptx)),
            vector_loads=len(re.findall(r"ld\.global[\w.]*\.v4\.b32", ptx)),
            scalar_16bit_loads=len(re.findall(r"ld\.global[\w.]*\.(?:b16|u16)\b", ptx)),
            scalar_8bit_loads=len(re.findall(r"ld\.global[\w.]*\.(?:b8|u8|s8)\b", ptx)),
        ))
    return out


def recorded_launches(call: Callable[[Callable], Any]) -> list[_Launch]:
    """The launches ``call(launcher)`` makes (``call`` runs a host function with that launcher), not run."""
    recorder = _Recorder()
    call(recorder)
    return recorder.launches


def compile_call(call: Callable[[Callable], Any], cc: int, launches: list[_Launch] | None = None) -> list[Artefact]:
    """AOT-compile every launch ``call`` makes (or ``launches``, recorded from it already)."""
    distinct = {}
    for launch in launches if launches is not None else recorded_launches(call):
        # row chunks launch the same kernel with the same constexprs
        key = (id(launch.kernel), tuple(sorted((k, v) for k, v in launch.kwargs.items() if isinstance(v, (int, str)))))
        distinct.setdefault(key, launch)
    return [artefact for launch in distinct.values() for artefact in compile_launch(launch, cc)]


@dataclass(frozen=True)
class Case:
    """One host call of the standard matrix: a kernel form, a weight dtype, rows and a weight shape."""

    form: str  # "float", "fused3" (3 segments, all biased), "fused4" (4, biases on 0 and 2), "int8", "int4"
    dtype: str  # activations (and float weights): "bfloat16", "float16", "float32"
    rows: int
    n: int
    k: int
    padded: bool  # rows of the input-major weight padded to 16 elements (kernels/layout.py on CUDA)

    @property
    def name(self) -> str:
        return f"{self.form}-{self.dtype}-m{self.rows}-{self.n}x{self.k}{'-padded' if self.padded else ''}"


def standard_cases() -> list[Case]:
    """Every kernel form, dtype and row bucket on N a multiple of 16 (4096), and N not (4100: a
    padded float weight, as attach lays it out on CUDA) on the smallest and largest buckets."""
    cases = []
    for rows in (1, 2, 4, 8):
        for dtype in ("bfloat16", "float16", "float32"):
            cases.append(Case("float", dtype, rows, 4096, 1024, False))
        cases += [Case("fused3", "bfloat16", rows, 4096 + 1024 + 1024, 1024, False),
                  Case("fused4", "float16", rows, 4 * 1024, 1024, False),
                  Case("int8", "bfloat16", rows, 4096, 1024, False), Case("int4", "bfloat16", rows, 4096, 1024, False)]
    for rows in (1, 8):
        cases += [Case("float", "bfloat16", rows, 4100, 1024, True), Case("float", "float32", rows, 4100, 1024, True)]
    return cases


def _input_major(n: int, k: int, dtype: torch.dtype, padded: bool) -> torch.Tensor:
    width = -(-n // 16) * 16 if padded else n
    return torch.empty(k, width, dtype=dtype)[:, :n].t()


def call_of(case: Case) -> Callable[[Callable], Any]:
    """The host call of ``case``, taking a launcher."""
    from . import triton_sparse_gemv as gemv

    dtype = getattr(torch, case.dtype)
    x = torch.empty(case.rows, case.k, dtype=dtype)
    t = torch.empty(case.k)
    if case.form == "float":
        w = _input_major(case.n, case.k, dtype, case.padded)
        return lambda launcher: gemv.sparse_gemv_triton(x, w, [t], [None], [case.n], launcher)
    if case.form == "fused3":
        w = _input_major(case.n, case.k, dtype, case.padded)
        splits = [4096, 1024, case.n - 5120]
        biases = [torch.empty(s, dtype=dtype) for s in splits]
        return lambda launcher: gemv.sparse_gemv_triton(x, w, [t, t, t], biases, splits, launcher)
    if case.form == "fused4":
        w = _input_major(case.n, case.k, dtype, case.padded)
        splits = [case.n // 4] * 4
        biases = [torch.empty(s, dtype=dtype) if i % 2 == 0 else None for i, s in enumerate(splits)]
        return lambda launcher: gemv.sparse_gemv_triton(x, w, [t] * 4, biases, splits, launcher)
    if case.form == "int8":
        q, s = torch.empty(case.k, case.n, dtype=torch.int8), torch.empty(case.n)
        return lambda launcher: gemv.sparse_gemv_int8_triton(x, q, s, t, None, launcher)
    if case.form == "int4":
        q, s = torch.empty(case.k, (case.n + 1) // 2, dtype=torch.uint8), torch.empty(case.k, -(-case.n // 32))
        return lambda launcher: gemv.sparse_gemv_int4_triton(x, q, s, case.n, t, None, launcher)
    raise ValueError(f"unknown kernel form {case.form!r}")


def compile_matrix(cases: list[Case], targets: tuple[int, ...] = TARGETS) -> Iterator[dict[str, Any]]:
    """One record per (case, target, config)."""
    for case in cases:
        for cc in targets:
            for artefact in compile_call(call_of(case), cc):
                yield {"case": case.name, **dataclasses.asdict(case), **dataclasses.asdict(artefact)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", type=int, action="append", help="compute capability (default: 80 and 90)")
    parser.add_argument("--case", action="append", help="only cases whose name contains this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("triton_aot: unset TRITON_INTERPRET (the interpreter gives no compilable kernels)")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cases = [c for c in standard_cases() if not args.case or any(s in c.name for s in args.case)]
    for record in compile_matrix(cases, tuple(args.cc or TARGETS)):
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
