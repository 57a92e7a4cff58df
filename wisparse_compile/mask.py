"""The mask: which input channels a sparse linear keeps. The one definition every route follows.

Channel ``i`` of a token's input ``x`` is kept iff ``|x_i| > t_i`` (compared in fp32) or ``x_i``
is NaN; pruned channels count as zero. NaN is kept so that it reaches the output as in the dense
op, never silently "pruned" to 0 (``NaN > t`` is False). For stacked expert weights each row is
compared with the thresholds of the expert it is routed to (``thresholds`` [E, in]).

Used by the ops' references and Triton/C++ kernels (which restate it in their languages, tested
against ``masked_input``), the eager masked reference (``reference.py``) and the allocation
search's candidate masks. A leaf module: it imports nothing from the package.
"""

from __future__ import annotations

import torch


def keep_mask(x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Boolean mask of kept channels: ``|x_i| > t_i`` in fp32, or ``x_i`` is NaN."""
    return (x.abs().float() > thresholds.float()) | x.isnan()


def expert_of_rows(offs: torch.Tensor, rows: int, num_experts: int) -> torch.Tensor:
    """Expert index of each of ``rows`` expert-sorted rows, from cumulative offsets ``offs``.

    Rows past ``offs[-1]`` (no expert; grouped mm leaves them out) get the last expert.
    """
    index = torch.arange(rows, device=offs.device, dtype=offs.dtype)
    return torch.searchsorted(offs, index, right=True).clamp_(max=num_experts - 1)


def expert_keep_mask(x: torch.Tensor, thresholds: torch.Tensor, row_experts: torch.Tensor | None) -> torch.Tensor:
    """Kept channels of ``x``: per-channel thresholds (1-D) or each row's expert's thresholds ([E, in]).

    With ``row_experts``, ``x`` holds ``len(row_experts)`` rows of ``in`` channels in any layout
    whose flattening is row-major ([S, in], [S, in, 1], [S, 1, in]).
    """
    if row_experts is None or thresholds.dim() == 1:
        return keep_mask(x, thresholds)
    per_row = thresholds[row_experts.to(thresholds.device).long()].reshape(x.shape)
    return keep_mask(x, per_row)


def apply_keep(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``x`` with the channels ``keep`` drops set to zero (same dtype and shape)."""
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_input(x: torch.Tensor, thresholds: torch.Tensor, row_experts: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` as a sparse linear sees it: pruned channels zeroed (see the module docstring)."""
    return apply_keep(x, expert_keep_mask(x, thresholds, row_experts))
