"""The ``wisparse::sparse_linear`` op: its plain-torch reference, its routes, and the route chooser.

Semantics (every route gives this result): ``x`` masked as ``wisparse_compile.mask`` defines
(channel i kept iff ``|x_i| > t_i`` in fp32, or NaN; pruned channels are zero), then ``x @ W^T + b``.

Routes (``routing.py`` names them; ``route_of`` picks one and is the only place that does):
decode-sized calls (at most ``max_sparse_rows`` token rows, guarded when the row count is symbolic)
run the Triton sparse GEMV on CUDA and the C++ kernel (``cpu_sparse_gemv.py``) on CPU when it
builds; everything else (prefill, no kernel) masks ``x`` and runs the dense linear, which Inductor
compiles and fuses (in fp32 for bf16/fp16 input-major weights on CPUs without native bf16/fp16
GEMM: ``masked_dense_linear``). Registered with ``torch.library.triton_op`` so that, inserted before
AOT autograd, Inductor traces the body and inlines the Triton kernel into its generated code.
The host code of the decode routes never reads a device value (no ``.item()``/``.tolist()``),
so they can be captured in CUDA graphs.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..mask import masked_input
from . import routing, triton_route
from .cpu_sparse_gemv import cpu_sparse_gemv, input_major_gemm_is_slow, uses_cpu_kernel

log = logging.getLogger(__name__)

SPARSE_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def sparse_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], thresholds: torch.Tensor
) -> torch.Tensor:
    """Mask then dense: the definition of the op, and its prefill route."""
    return F.linear(masked_input(x, thresholds), weight, bias)


def masked_dense_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], thresholds: torch.Tensor
) -> torch.Tensor:
    """The masked dense route (prefill, no kernel): the reference, in fp32 where bf16/fp16 is slow.

    PyTorch's CPU GEMM has no fast bf16/fp16 path for an input-major weight unless the CPU has
    native support (``input_major_gemm_is_slow``), and Inductor calls that same GEMM: on a 2-core
    AVX2 EPYC a 16-token 2048x8192 bf16 linear took ~2.2 s compiled, ~0.06 s on the row-major
    weight. Widening (an fp32 copy of the weight per call; MKL reads any layout) brought it to
    ~0.16 s; the result equals the bf16 GEMM's up to summation order (both accumulate in fp32).
    """
    if weight.dim() == 2 and weight.stride(-1) != 1 and input_major_gemm_is_slow(weight):
        bias32 = None if bias is None else bias.float()
        return sparse_linear_reference(x.float(), weight.float(), bias32, thresholds).to(x.dtype)
    return sparse_linear_reference(x, weight, bias, thresholds)


def check_operands(x: torch.Tensor, weight: torch.Tensor, thresholds: torch.Tensor) -> None:
    """Shapes and dtypes of one sparse linear's operands, each failure naming the problem."""
    torch._check(weight.dim() == 2, lambda: f"sparse_linear expects a 2-D [out, in] weight, got {weight.dim()}-D")
    torch._check(
        x.shape[-1] == weight.shape[1],
        lambda: f"sparse_linear: input has {x.shape[-1]} channels, weight expects {weight.shape[1]}",
    )
    torch._check(
        thresholds.dim() == 1 and thresholds.shape[0] == weight.shape[1],
        lambda: f"sparse_linear: thresholds must be 1-D of length {weight.shape[1]}, got {tuple(thresholds.shape)}",
    )
    torch._check(
        thresholds.is_floating_point(),
        lambda: f"sparse_linear: thresholds must be floating point (float32), got {thresholds.dtype}",
    )


def route_of(x: torch.Tensor, weight: torch.Tensor, max_sparse_rows: int) -> str:
    """The route a ``sparse_linear(x, weight, ...)`` call takes (``routing.ROUTES``).

    The op body calls this, and so may a report: both see the same answer, and with a symbolic
    row count both install the same guard (``routing.decode_sized``).
    """
    return route_by_device(x, max_sparse_rows, lambda: uses_cpu_kernel(x, weight, max_sparse_rows))


def route_by_device(x: torch.Tensor, max_sparse_rows: int, takes_cpu_kernel: Callable[[], bool]) -> str:
    """The routing rule the fp32/bf16 op and the int8 op share: masked dense for dtypes the kernels
    do not take, the Triton GEMV for decode-sized calls on its devices, else the C++ kernel where
    ``takes_cpu_kernel()`` (each op's own layout and build check) says so."""
    if x.dtype not in SPARSE_KERNEL_DTYPES or x.shape[-1] == 0:
        return routing.MASKED_DENSE
    if x.device.type in triton_route.TRITON_DEVICES:
        return routing.TRITON if uses_sparse_kernel(x, max_sparse_rows) else routing.MASKED_DENSE
    if takes_cpu_kernel():
        return routing.CPU_KERNEL
    return routing.MASKED_DENSE


def uses_sparse_kernel(x: torch.Tensor, max_sparse_rows: int) -> bool:
    """Whether a call takes the Triton sparse GEMV (decode-sized calls on ``triton_route.TRITON_DEVICES``)."""
    if x.dtype not in SPARSE_KERNEL_DTYPES or x.device.type not in triton_route.TRITON_DEVICES:
        return False
    return routing.decode_sized(x, max_sparse_rows) and triton_route.triton_route_possible(x.device.type)


def sparse_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    thresholds: torch.Tensor,
    launcher=lambda kernel: kernel,
    max_rows: int = 8,
    launch=None,
) -> torch.Tensor:
    """Run the Triton sparse GEMV on any device Triton reaches (CUDA, or CPU under TRITON_INTERPRET=1).

    ``launch`` (a ``triton_sparse_gemv.Launch``) fixes block sizes and K slices instead of autotuning.
    """
    from .triton_sparse_gemv import sparse_gemv_triton  # imports triton

    check_operands(x, weight, thresholds)
    n, k = weight.shape
    out = sparse_gemv_triton(x.reshape(-1, k), weight, [thresholds], [bias], [n], launcher, max_rows, launch)
    return out.reshape(*x.shape[:-1], n)


@triton_route.triton_op("wisparse::sparse_linear", mutates_args=())
def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    thresholds: torch.Tensor,
    max_sparse_rows: int = 8,
) -> torch.Tensor:
    """``F.linear(x masked by |x| > thresholds, weight, bias)``, routed by ``route_of``."""
    check_operands(x, weight, thresholds)
    route = route_of(x, weight, max_sparse_rows)
    if route == routing.TRITON:
        return sparse_gemv(x, weight, bias, thresholds, torch.library.wrap_triton, max_sparse_rows)
    if route == routing.CPU_KERNEL:
        return cpu_sparse_gemv(x, weight, bias, thresholds)
    return masked_dense_linear(x, weight, bias, thresholds)
