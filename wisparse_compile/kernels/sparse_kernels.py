"""The route table: per (layout, device) the sparse kernel a decode-sized call runs, and the one route chooser.

``KERNELS[(layout, device)]`` is a ``SparseKernel``: its ``Route``, whether a call fits it
(``takes``: dtype, row count, weight layout, the kernel built or Triton installed), how one linear
runs on it and, where the kernel has one, how a sibling group runs in one call. ``device`` is
``"triton"`` for the devices in ``triton_route.TRITON_DEVICES`` (CUDA) and the device type
otherwise. A call that finds no entry, or an entry that does not take it, runs the masked dense
route (``formats.masked_dense``). ``route_of`` is the only place that decides; the ops call it at
trace time and the passes ask it for their reports, so both see the same answer and, with a
symbolic row count, install the same guard (``routing.decode_sized``).

Today: float, int8 and int4 weights on Triton devices (the Triton sparse GEMVs,
``triton_sparse_gemv.py``; float siblings in one launch over a concatenated input-major weight),
float, int8 and int4 weights on the CPU (the C++ GEMV, ``cpu_sparse_gemv.py``; int8/int4 siblings
in one call).

The host code of the decode routes never reads a device value (no ``.item()``/``.tolist()``), so
they can be captured in CUDA graphs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from . import triton_route
from .cpu_sparse_gemv import (
    cpu_sparse_gemv,
    cpu_sparse_gemv_int4,
    cpu_sparse_gemv_int4_group,
    cpu_sparse_gemv_int8,
    cpu_sparse_gemv_int8_group,
    uses_cpu_kernel,
    uses_cpu_kernel_quantized,
)
from .routing import DEFAULT_MAX_SPARSE_ROWS, Layout, Route, decode_sized

log = logging.getLogger(__name__)

#: Activation dtypes any sparse kernel takes (each kernel may take fewer: the C++ one has no fp16).
SPARSE_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: The device key of the devices in ``triton_route.TRITON_DEVICES``.
TRITON = "triton"

#: (x, weight, bias, thresholds, scale, out_features, max_rows) -> out
SingleRun = Callable[..., torch.Tensor]
#: (x, weights, biases, thresholds, scales, out_features, fused_weight, max_rows) -> out, outputs concatenated
GroupRun = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class SparseKernel:
    """One entry of the route table.

    takes: (x, weight, max_rows) -> whether this call fits the kernel (decode-sized and the rest).
    single: runs one linear. group: runs sibling linears in one call, or None (then each member
    runs ``single``). group_needs_fused_weight: the group reads one concatenated input-major copy of
    the weights (``passes/fuse_siblings.py`` prepares it); without it the members run one by one.
    """

    route: Route
    takes: Callable[[torch.Tensor, torch.Tensor, int], bool]
    single: SingleRun
    group: GroupRun | None = None
    group_needs_fused_weight: bool = False


def device_key(device: torch.device) -> str:
    """The route table's device key: ``"triton"`` for a Triton device, else the device type."""
    return TRITON if device.type in triton_route.TRITON_DEVICES else device.type


# ---- the Triton GEMV, on any device Triton reaches (CUDA, or CPU under TRITON_INTERPRET=1) ----

def sparse_gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], thresholds: torch.Tensor,
    launcher=lambda kernel: kernel, max_rows: int = DEFAULT_MAX_SPARSE_ROWS, launch=None,
) -> torch.Tensor:
    """One float linear through the Triton sparse GEMV; ``launch`` (a ``triton_sparse_gemv.Launch``)
    fixes block sizes and K slices instead of autotuning."""
    return sparse_gemv_fused(x, weight, [bias], [thresholds], [weight.shape[0]], launcher, max_rows, launch)


def sparse_gemv_fused(
    x: torch.Tensor, fused_weight: torch.Tensor, biases: List[Optional[torch.Tensor]], thresholds: List[torch.Tensor],
    splits: List[int], launcher=lambda kernel: kernel, max_rows: int = DEFAULT_MAX_SPARSE_ROWS, launch=None,
) -> torch.Tensor:
    """Sibling float linears through one Triton sparse GEMV over their concatenated weight."""
    from .triton_sparse_gemv import sparse_gemv_triton  # imports triton

    n, k = fused_weight.shape
    out = sparse_gemv_triton(x.reshape(-1, k), fused_weight, thresholds, biases, splits, launcher, max_rows, launch)
    return out.reshape(*x.shape[:-1], n)


def sparse_gemv_int8(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
    thresholds: Optional[torch.Tensor], launcher=lambda kernel: kernel, max_rows: int = DEFAULT_MAX_SPARSE_ROWS,
    launch=None,
) -> torch.Tensor:
    """One int8 linear through the Triton int8 sparse GEMV."""
    from .triton_sparse_gemv import sparse_gemv_int8_triton  # imports triton

    k, n = qweight.shape
    out = sparse_gemv_int8_triton(x.reshape(-1, k), qweight, scale, thresholds, bias, launcher, max_rows, launch)
    return out.reshape(*x.shape[:-1], n)


def _triton_takes(x: torch.Tensor, weight: torch.Tensor, max_rows: int) -> bool:
    return decode_sized(x, max_rows) and triton_route.triton_route_possible(x.device.type)


def _float_triton(x, weight, bias, thresholds, scale, out_features, max_rows):
    return sparse_gemv(x, weight, bias, thresholds, torch.library.wrap_triton, max_rows)


def _float_triton_group(x, weights, biases, thresholds, scales, out_features, fused_weight, max_rows):
    return sparse_gemv_fused(x, fused_weight, biases, thresholds, out_features, torch.library.wrap_triton, max_rows)


def _int8_triton(x, weight, bias, thresholds, scale, out_features, max_rows):
    return sparse_gemv_int8(x, weight, scale, bias, thresholds, torch.library.wrap_triton, max_rows)


def sparse_gemv_int4(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, out_features: int, bias: Optional[torch.Tensor],
    thresholds: Optional[torch.Tensor], launcher=lambda kernel: kernel, max_rows: int = DEFAULT_MAX_SPARSE_ROWS,
    launch=None,
) -> torch.Tensor:
    """One int4 linear through the Triton int4 sparse GEMV (packed codes, per-group scales)."""
    from .triton_sparse_gemv import sparse_gemv_int4_triton  # imports triton

    k = qweight.shape[0]
    out = sparse_gemv_int4_triton(x.reshape(-1, k), qweight, scale, out_features, thresholds, bias, launcher, max_rows, launch)
    return out.reshape(*x.shape[:-1], out_features)


def _int4_triton(x, weight, bias, thresholds, scale, out_features, max_rows):
    return sparse_gemv_int4(x, weight, scale, out_features, bias, thresholds, torch.library.wrap_triton, max_rows)


# ---- the C++ GEMV ----

def _float_cpu(x, weight, bias, thresholds, scale, out_features, max_rows):
    return cpu_sparse_gemv(x, weight, bias, thresholds)


def _int8_cpu(x, weight, bias, thresholds, scale, out_features, max_rows):
    return cpu_sparse_gemv_int8(x, weight, scale, bias, thresholds)


def _int8_cpu_group(x, weights, biases, thresholds, scales, out_features, fused_weight, max_rows):
    return cpu_sparse_gemv_int8_group(x, weights, scales, biases, thresholds)


def _int4_cpu(x, weight, bias, thresholds, scale, out_features, max_rows):
    return cpu_sparse_gemv_int4(x, weight, scale, out_features, bias, thresholds)


def _int4_cpu_group(x, weights, biases, thresholds, scales, out_features, fused_weight, max_rows):
    return cpu_sparse_gemv_int4_group(x, weights, scales, out_features, biases, thresholds)


def _quantized_cpu_takes(x: torch.Tensor, weight: torch.Tensor, max_rows: int) -> bool:
    return uses_cpu_kernel_quantized(x, max_rows)  # codes are always stored input-major


KERNELS: dict[tuple[Layout, str], SparseKernel] = {
    (Layout.FLOAT, TRITON): SparseKernel(Route.TRITON, _triton_takes, _float_triton, _float_triton_group,
                                         group_needs_fused_weight=True),
    (Layout.INT8, TRITON): SparseKernel(Route.TRITON, _triton_takes, _int8_triton),
    (Layout.INT4, TRITON): SparseKernel(Route.TRITON, _triton_takes, _int4_triton),
    (Layout.FLOAT, "cpu"): SparseKernel(Route.CPU_KERNEL, uses_cpu_kernel, _float_cpu),
    (Layout.INT8, "cpu"): SparseKernel(Route.CPU_KERNEL, _quantized_cpu_takes, _int8_cpu, _int8_cpu_group),
    (Layout.INT4, "cpu"): SparseKernel(Route.CPU_KERNEL, _quantized_cpu_takes, _int4_cpu, _int4_cpu_group),
}

_logged_missing: set[tuple[Layout, str]] = set()


def kernel_for(x: torch.Tensor, weight: torch.Tensor, layout: Layout, max_rows: int) -> SparseKernel | None:
    """The table entry a call runs on, or None for the masked dense route."""
    if x.dtype not in SPARSE_KERNEL_DTYPES or x.shape[-1] == 0:
        return None
    device = device_key(x.device)
    kernel = KERNELS.get((layout, device))
    if kernel is None:
        if device == TRITON and (layout, device) not in _logged_missing and decode_sized(x, max_rows):
            _logged_missing.add((layout, device))
            log.warning(
                "wisparse: no Triton kernel for %s weights exists yet: their decode calls on %s take the masked "
                "dense route (correct, not faster)", layout.value, x.device.type,
            )
        return None
    return kernel if kernel.takes(x, weight, max_rows) else None


def route_of(x: torch.Tensor, weight: torch.Tensor, layout: Layout | str = Layout.FLOAT,
             max_rows: int = DEFAULT_MAX_SPARSE_ROWS) -> Route:
    """The route a sparse linear of ``layout`` takes for activation ``x`` and weight operand ``weight``."""
    kernel = kernel_for(x, weight, Layout(layout), max_rows)
    return Route.MASKED_DENSE if kernel is None else kernel.route
