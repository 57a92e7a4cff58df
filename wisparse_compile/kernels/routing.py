"""Which route a ``sparse_linear`` call takes, decided the same way at trace time and in reports.

Routes: ``TRITON`` (the Triton sparse GEMV, decode-sized calls on CUDA), ``CPU_KERNEL`` (the C++
sparse GEMV, decode-sized fp32/bf16 calls on CPU), ``MASKED_DENSE`` (mask, then the dense matmul:
prefill, or no kernel for this device/dtype).

Decode-sized means at most ``max_sparse_rows`` token rows. With a symbolic row count (automatic
dynamic shapes after a second batch size, or ``dynamic=True``) the count is compared on its hint
and the comparison becomes a guard of the compiled graph (``guard_or_false``): a graph traced with
a batch of 3 serves every batch up to ``max_sparse_rows`` with the sparse kernel, and a larger batch
fails the guard and recompiles to the dense route. ``statically_known_true`` (the old test) is
False for any symbol, so a dynamic decode graph silently lowered to masked dense.

A leaf of the package's kernels: imports nothing from them.
"""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false

TRITON = "triton"
CPU_KERNEL = "cpu_kernel"
MASKED_DENSE = "masked_dense"
ROUTES = (TRITON, CPU_KERNEL, MASKED_DENSE)


def token_rows(x: torch.Tensor) -> int | torch.SymInt:
    """Rows of ``x`` seen as ``[rows, in]`` (every leading dim is a token dim)."""
    return x.numel() // x.shape[-1]


def decode_sized(x: torch.Tensor, max_rows: int) -> bool:
    """Whether ``x`` has at most ``max_rows`` token rows; guarded on its hint when symbolic.

    An unbacked (data-dependent) row count cannot be guarded and counts as not decode-sized.
    """
    if x.shape[-1] == 0:
        return False
    return guard_or_false(token_rows(x) <= max_rows)
