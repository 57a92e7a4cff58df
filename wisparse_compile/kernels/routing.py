"""The vocabulary of routing: weight layouts, the routes a call may take, and what decode-sized means.

``Route`` is the one route enum of the package: the kernels choose one (``sparse_kernels.route_of``),
the passes record it per linear and the reports show it. ``Layout`` names how a weight operand is
stored (float ``[out, in]``, int8 codes, packed int4 codes); a route is chosen per (layout, device,
rows) in one table (``sparse_kernels.KERNELS``).

Decode-sized means at most ``max_sparse_rows`` token rows. With a symbolic row count (automatic
dynamic shapes after a second batch size, or ``dynamic=True``) the count is compared on its hint
and the comparison becomes a guard of the compiled graph (``guard_or_false``): a graph traced with
a batch of 3 serves every batch up to ``max_sparse_rows`` with the sparse kernel, and a larger batch
fails the guard and recompiles to the dense route. ``statically_known_true`` (the old test) is
False for any symbol, so a dynamic decode graph silently lowered to masked dense.

A leaf of the package's kernels: imports nothing from them.
"""

from __future__ import annotations

import enum

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false

#: Calls with at most this many token rows (decode: batch 1..8) take the sparse kernels by default.
DEFAULT_MAX_SPARSE_ROWS = 8


class Route(str, enum.Enum):
    """How a linear runs (compares equal to its value: ``route == "cpu_kernel"``)."""

    DENSE = "dense"  # not rewritten: the original op
    TRITON = "triton"  # the Triton sparse GEMV: decode-sized on a Triton device (CUDA)
    CPU_KERNEL = "cpu_kernel"  # the C++ sparse GEMV: decode-sized on the CPU, the kernel built
    MASKED_DENSE = "masked_dense"  # prefill-sized, or no sparse kernel for this layout/device/dtype: mask, then dense


class Layout(str, enum.Enum):
    """How a weight operand of the sparse ops is stored (``quant.primitives`` defines the codes)."""

    FLOAT = "float"  # [out, in] in the activations' float dtype (input-major for the sparse kernels)
    INT8 = "int8"  # int8 codes [in, out] and fp32 scales [out]
    INT4 = "int4"  # packed 4-bit codes uint8 [in, ceil(out/2)] and fp32 scales [in, ceil(out/32)]


def token_rows(x: torch.Tensor) -> int | torch.SymInt:
    """Rows of ``x`` as a linear sees it, ``[rows, in]``: every dim but the last, multiplied (may be
    symbolic); 0 for a scalar or no input features, where no kernel has rows to run."""
    if x.dim() == 0 or x.shape[-1] == 0:
        return 0
    rows = 1
    for size in x.shape[:-1]:
        rows = rows * size
    return rows


def decode_sized(x: torch.Tensor, max_rows: int) -> bool:
    """Whether ``x`` has at most ``max_rows`` token rows; guarded on its hint when symbolic.

    An unbacked (data-dependent) row count cannot be guarded and counts as not decode-sized.
    """
    if x.shape[-1] == 0:
        return False
    return guard_or_false(token_rows(x) <= max_rows)
