"""The input-major weight layout the sparse kernels read: one contiguous row per input channel.

A pruned input channel then skips one contiguous row of ``W[:, k]``. On a GPU each row starts on a
16-byte boundary (padded with zeros past ``out``), so the Triton kernel loads every row as 16-byte
vectors whatever the output width (vocabulary sizes and some MLP widths are not multiples of 8).

A leaf: imports nothing from the package.
"""

from __future__ import annotations

import torch


#: Input-major rows on a GPU start on this many bytes, so the Triton kernel reads them as 16-byte vectors.
ROW_ALIGN_BYTES = 16


def padded_row_length(weight: torch.Tensor) -> int:
    """The row length (elements) of ``weight``'s input-major copy: ``out`` features, rounded up on CUDA
    to a ``ROW_ALIGN_BYTES`` multiple (a 4100-wide bf16 row would otherwise start misaligned and
    every load would be a scalar one); on the CPU rows stay dense (the C++ kernel needs no padding)."""
    out = weight.shape[0]
    if weight.device.type != "cuda":
        return out
    per_vector = max(1, ROW_ALIGN_BYTES // weight.element_size())
    return -(-out // per_vector) * per_vector


def input_major(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] with the same values, laid out input-major: storage ``[in, rows]`` (rows
    from ``padded_row_length``, the padding zero), seen as ``[out, in]`` with strides ``(1, rows)``."""
    out, k = weight.shape
    rows = padded_row_length(weight)
    if rows == out:
        return weight.t().contiguous().t()
    storage = torch.zeros(k, rows, dtype=weight.dtype, device=weight.device)
    storage[:, :out].copy_(weight.t())
    return storage[:, :out].t()
