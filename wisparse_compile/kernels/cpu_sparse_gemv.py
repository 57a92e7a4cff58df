"""The C++ CPU sparse GEMV (``wisparse_cpu::sparse_gemv``, source beside: ``cpu_sparse_gemv.cpp``):
its lazy build, fake kernels and routing tests, and the CPU-side compile helpers. The same
extension holds ``wisparse_cpu::sparse_gemv_int8`` (int8 input-major weights, fp32 scales per
output channel, applied with the bias in the epilogue; ``thresholds=None`` runs it dense) and
``wisparse_cpu::sparse_gemv_int4`` (4-bit codes packed two per byte, input-major, fp32 scales per
input channel and 32-output group, applied per kept row; ``quant.primitives.quantize_int4``), and their
``_group`` forms: sibling weights that read one x in one call, outputs concatenated
(``kernels/group_op.py``).

Built on first use (not at import) with ``torch.utils.cpp_extension.load`` into torch's extension
cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``): about 45 s the first time,
a fraction of a second afterwards. The build uses ``-march=native``, so the extension's name
(``extension_name``) carries a hash of the source, the flags, the compiler, torch's version and
the CPU's instruction-set features: a cache on shared storage never hands one CPU a binary built
for another. If the toolchain is missing or the build fails, ``cpu_kernel_available()`` says False,
one warning explains why, and callers take the masked dense reference route instead.

Threads: a call splits its kept rows between torch's threads where each thread streams at least
``WISPARSE_CPU_BYTES_PER_THREAD`` bytes of weights (default 32 KiB, read once per process). The
build passes ``-fopenmp``: ATen's ``parallel_for`` is header code that compiles to a serial loop
without it (``torch.ops.wisparse_cpu.parallel_threads(n)`` says how many threads a split really
uses). On the 2-core development machine one core reads ~18 GB/s and two ~30 GB/s; splitting
calls of 20-64 KiB per thread and up measured alike, 128 KiB slower, a serial kernel 0.84x.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import warnings
from typing import Optional

import torch

from .routing import decode_sized

log = logging.getLogger(__name__)

CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
#: Most token rows one call may have (the C++ kernel's limit).
CPU_KERNEL_MAX_ROWS = 8
_SOURCE = os.path.join(os.path.dirname(__file__), "cpu_sparse_gemv.cpp")
CFLAGS = ("-O3", "-march=native")

_state: dict[str, object] = {"tried": False, "ok": False}
_logged_layouts: set[tuple[int, ...]] = set()


def cpu_features() -> str:
    """The CPU's instruction-set features: the ``flags`` of /proc/cpuinfo (Linux), else the
    machine type and torch's detected vector capability."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86 / aarch64
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}"


def extension_name(cflags: tuple[str, ...] = CFLAGS, features: str | None = None, source: str = _SOURCE) -> str:
    """The cache name of the build: a hash of the source, flags, compiler, torch version and CPU features."""
    key = hashlib.sha256()
    with open(source, "rb") as f:
        key.update(f.read())
    for part in (" ".join(cflags), os.environ.get("CXX", "c++"), torch.__version__, features or cpu_features()):
        key.update(b"\0" + part.encode())
    return f"wisparse_cpu_sparse_gemv_{key.hexdigest()[:16]}"


OPENMP_FLAGS = ("-fopenmp",)


def _build() -> None:
    """Compile and load the extension; registers ``torch.ops.wisparse_cpu.sparse_gemv``.

    Built with OpenMP (``OPENMP_FLAGS``) so a call can split between threads; where the toolchain
    has no OpenMP (clang without libomp), built again without it: correct, one thread per call.
    """
    from torch.utils.cpp_extension import load

    def build(cflags: tuple[str, ...], ldflags: tuple[str, ...]) -> None:
        name = extension_name(cflags)
        log.info("wisparse: building the CPU sparse GEMV kernel %s (first use; cached afterwards)", name)
        load(name=name, sources=[_SOURCE], extra_cflags=list(cflags), extra_ldflags=list(ldflags),
             is_python_module=False, verbose=False)

    try:
        build(CFLAGS + OPENMP_FLAGS, OPENMP_FLAGS)
    except Exception:  # noqa: BLE001 - retried without OpenMP below; a second failure propagates
        log.warning("wisparse: the CPU kernel did not build with OpenMP; building it single-threaded", exc_info=True)
        build(CFLAGS, ())


def _load() -> None:
    """Build (or load from the cache) the extension, then give it a fake kernel for tracing."""
    if hasattr(torch.ops.wisparse_cpu, "sparse_gemv"):
        return
    _build()

    @torch.library.register_fake("wisparse_cpu::sparse_gemv")
    def _(x: torch.Tensor, wt: torch.Tensor, bias: Optional[torch.Tensor], thresholds: torch.Tensor) -> torch.Tensor:
        torch._check(x.dim() == 2 and wt.dim() == 2 and x.shape[1] == wt.shape[0])
        return x.new_empty(x.shape[0], wt.shape[1])

    @torch.library.register_fake("wisparse_cpu::sparse_gemv_int8")
    def _(
        x: torch.Tensor, qt: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
        thresholds: Optional[torch.Tensor],
    ) -> torch.Tensor:
        torch._check(x.dim() == 2 and qt.dim() == 2 and x.shape[1] == qt.shape[0])
        return x.new_empty(x.shape[0], qt.shape[1])

    @torch.library.register_fake("wisparse_cpu::sparse_gemv_int4")
    def _(
        x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, n: int, bias: Optional[torch.Tensor],
        thresholds: Optional[torch.Tensor],
    ) -> torch.Tensor:
        torch._check(x.dim() == 2 and packed.dim() == 2 and x.shape[1] == packed.shape[0])
        torch._check(packed.shape[1] == (n + 1) // 2)
        return x.new_empty(x.shape[0], n)

    @torch.library.register_fake("wisparse_cpu::sparse_gemv_int8_group")
    def _(
        x: torch.Tensor, qts: list[torch.Tensor], scales: list[torch.Tensor], biases: list[Optional[torch.Tensor]],
        thresholds: list[Optional[torch.Tensor]],
    ) -> torch.Tensor:
        torch._check(x.dim() == 2 and all(qt.dim() == 2 and x.shape[1] == qt.shape[0] for qt in qts))
        return x.new_empty(x.shape[0], sum(qt.shape[1] for qt in qts))

    @torch.library.register_fake("wisparse_cpu::sparse_gemv_int4_group")
    def _(
        x: torch.Tensor, packed: list[torch.Tensor], scales: list[torch.Tensor], ns: list[int],
        biases: list[Optional[torch.Tensor]], thresholds: list[Optional[torch.Tensor]],
    ) -> torch.Tensor:
        torch._check(x.dim() == 2 and all(p.dim() == 2 and x.shape[1] == p.shape[0] for p in packed))
        return x.new_empty(x.shape[0], sum(ns))


def cpu_kernel_available() -> bool:
    """Build/load the kernel once per process; False (with one warning) if that fails."""
    if not _state["tried"]:
        _state["tried"] = True
        try:
            _load()
            _state["ok"] = True
        except Exception as e:  # a missing compiler must never stop a model from compiling
            warnings.warn(
                f"wisparse: the C++ CPU sparse kernel is unavailable ({type(e).__name__}: {e}); "
                "CPU decode runs the masked dense reference (correct, not faster). Install a C++ "
                "compiler (g++ or clang) and ninja to get the sparse speed-up.",
                RuntimeWarning,
                stacklevel=2,
            )
            log.warning("wisparse: CPU kernel build failed", exc_info=True)
    return bool(_state["ok"])


def input_major_gemm_is_slow(weight: torch.Tensor) -> bool:
    """Whether matmuls on ``weight`` laid out input-major take PyTorch's slow CPU GEMM path.

    PyTorch's CPU GEMM runs bf16/fp16 through oneDNN only where the CPU has native support
    (AVX512-BF16/FP16, AMX); elsewhere its fallback is vectorized only when the reduction runs
    along contiguous memory of the weight, which input-major weights do not have (a 16-token
    8192x2048 bf16 linear: ~2 s instead of ~0.06 s on a 2-core AVX2 EPYC), eager or compiled
    (Inductor calls the same GEMM).
    """
    if weight.device.type != "cpu":
        return False
    if weight.dtype == torch.bfloat16:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if weight.dtype == torch.float16:
        return not torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


def _fits_cpu_kernel(x: torch.Tensor, max_sparse_rows: int) -> bool:
    """CPU, fp32/bf16 activations, few rows (guarded when symbolic, see ``routing.decode_sized``)."""
    if x.device.type != "cpu" or x.dtype not in CPU_KERNEL_DTYPES or x.shape[-1] == 0:
        return False
    return decode_sized(x, min(max_sparse_rows, CPU_KERNEL_MAX_ROWS))  # else prefill: the masked dense route


def uses_cpu_kernel(x: torch.Tensor, weight: torch.Tensor, max_sparse_rows: int) -> bool:
    """Whether a call on a float weight takes the C++ kernel: CPU, fp32/bf16, few rows, the weight in
    ``x``'s dtype and input-major, and the kernel builds here."""
    if weight.dtype != x.dtype or not _fits_cpu_kernel(x, max_sparse_rows):
        return False
    if not weight.t().is_contiguous():
        shape = tuple(weight.shape)
        if shape not in _logged_layouts:
            _logged_layouts.add(shape)
            log.info(
                "wisparse: weight %s is not input-major (strides %s), so it takes the masked dense route; "
                "wsc.attach(model, plan) re-lays planned weights input-major",
                shape,
                tuple(weight.stride()),
            )
        return False
    return cpu_kernel_available()


def cpu_sparse_gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], thresholds: torch.Tensor
) -> torch.Tensor:
    """A float sparse linear through the C++ kernel: any leading dims, ``weight`` [out, in] input-major."""
    n, k = weight.shape
    out = torch.ops.wisparse_cpu.sparse_gemv(x.reshape(-1, k), weight.t(), bias, thresholds)
    return out.reshape(*x.shape[:-1], n)


def uses_cpu_kernel_quantized(x: torch.Tensor, max_sparse_rows: int) -> bool:
    """Whether a call on int8 or int4 codes takes the C++ kernel: CPU, fp32/bf16 activations, few rows,
    kernel built. (Codes are always stored input-major, so there is no layout to check.)"""
    return _fits_cpu_kernel(x, max_sparse_rows) and cpu_kernel_available()


def cpu_sparse_gemv_int8(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
    thresholds: Optional[torch.Tensor],
) -> torch.Tensor:
    """An int8 sparse linear through the C++ kernel: any leading dims, ``qweight`` int8 [in, out]."""
    k, n = qweight.shape
    out = torch.ops.wisparse_cpu.sparse_gemv_int8(x.reshape(-1, k), qweight, scale, bias, thresholds)
    return out.reshape(*x.shape[:-1], n)


def cpu_sparse_gemv_int4(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, out_features: int, bias: Optional[torch.Tensor],
    thresholds: Optional[torch.Tensor],
) -> torch.Tensor:
    """An int4 sparse linear through the C++ kernel: any leading dims, ``packed`` uint8 [in, ceil(out/2)]."""
    k = packed.shape[0]
    out = torch.ops.wisparse_cpu.sparse_gemv_int4(x.reshape(-1, k), packed, scale, out_features, bias, thresholds)
    return out.reshape(*x.shape[:-1], out_features)


def cpu_sparse_gemv_int8_group(
    x: torch.Tensor, qweights: list[torch.Tensor], scales: list[torch.Tensor], biases: list[Optional[torch.Tensor]],
    thresholds: list[Optional[torch.Tensor]],
) -> torch.Tensor:
    """int8 siblings through the C++ kernel: one call, outputs concatenated."""
    k = qweights[0].shape[0]
    out = torch.ops.wisparse_cpu.sparse_gemv_int8_group(x.reshape(-1, k), qweights, scales, biases, thresholds)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def cpu_sparse_gemv_int4_group(
    x: torch.Tensor, packed: list[torch.Tensor], scales: list[torch.Tensor], out_features: list[int],
    biases: list[Optional[torch.Tensor]], thresholds: list[Optional[torch.Tensor]],
) -> torch.Tensor:
    """int4 siblings through the C++ kernel: one call, outputs concatenated."""
    k = packed[0].shape[0]
    out = torch.ops.wisparse_cpu.sparse_gemv_int4_group(x.reshape(-1, k), packed, scales, out_features, biases, thresholds)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def cpu_compile_patches(example_inputs) -> dict[str, object]:
    """Inductor config patches for compiling a rewritten graph that may run on CPU.

    Compiled-graph caches are keyed on the Dynamo graph, not on which route the op body took, so
    a cache hit can skip the body: load the kernel first (cached code calls it by name), and if it
    is unavailable keep the caches out of the way so code that needs the kernel is never reused.
    """
    on_cpu = any(
        isinstance(e, torch.Tensor) and e.device.type == "cpu" and e.dtype in CPU_KERNEL_DTYPES
        for e in example_inputs
    )
    if not on_cpu or cpu_kernel_available():
        return {}
    return {"fx_graph_cache": False}
