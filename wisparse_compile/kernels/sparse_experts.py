"""Sparse contractions of stacked expert weights: ``wisparse::sparse_grouped_mm`` and ``sparse_bmm``.

Semantics: each row of the activation belongs to one expert; channel i of a row routed to expert
e is kept iff ``|x_i| > thresholds[e, i]`` (fp32), pruned channels count as zero, then the
original contraction runs unchanged. The expert of a row comes from ``offs`` for grouped mm (rows
are sorted by expert; ``offs`` are the cumulative row counts) and from the gathered ``expert_ids``
for bmm on ``W[expert_ids]``.

Both ops are opaque custom ops (as transformers' own grouped-mm fallback is): the grouped
contraction loops over data-dependent group sizes, which Inductor cannot trace. Their bodies are
the plain-torch reference; a Triton kernel can take the same op later.
"""

from __future__ import annotations

import torch

from .sparse_linear import keep_mask


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
    per_row = thresholds[row_experts.to(thresholds.device).long()]
    return x.abs().float() > per_row.reshape(x.shape).float()


def _masked(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def grouped_mm_dense(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, native: bool) -> torch.Tensor:
    """``x[rows of group e] @ weight[e]`` for each group: ``torch._grouped_mm`` or a loop over groups."""
    if native:
        return torch._grouped_mm(x, weight, offs=offs)
    out = torch.zeros(x.shape[0], weight.shape[2], dtype=x.dtype, device=x.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end], weight[e], out=out[start:end])
        start = end
    return out


@torch.library.custom_op("wisparse::sparse_grouped_mm", mutates_args=())
def sparse_grouped_mm(
    x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, thresholds: torch.Tensor, native: bool
) -> torch.Tensor:
    """Grouped mm of expert-sorted ``x`` [S, in] with ``weight`` [E, in, out], each row masked by its
    expert's thresholds [E, in]. native: contract with ``torch._grouped_mm`` (else a loop)."""
    torch._check(weight.dim() == 3 and thresholds.shape == (weight.shape[0], weight.shape[1]),
                 lambda: f"sparse_grouped_mm: thresholds {tuple(thresholds.shape)} do not fit weight {tuple(weight.shape)}")
    rows = expert_of_rows(offs, x.shape[0], weight.shape[0])
    return grouped_mm_dense(_masked(x, expert_keep_mask(x, thresholds, rows)), weight, offs, native)


@sparse_grouped_mm.register_fake
def _(x, weight, offs, thresholds, native):
    return x.new_empty(x.shape[0], weight.shape[2])


@torch.library.custom_op("wisparse::sparse_bmm", mutates_args=())
def sparse_bmm(
    a: torch.Tensor, b: torch.Tensor, thresholds: torch.Tensor, expert_ids: torch.Tensor, weight_arg: int
) -> torch.Tensor:
    """``torch.bmm(a, b)`` where operand ``weight_arg`` is the gathered ``W[expert_ids]`` and the other,
    the activation ([S, in, 1] or [S, 1, in]), is masked row by row by ``thresholds[expert_ids]``."""
    if weight_arg == 0:
        b = _masked(b, expert_keep_mask(b, thresholds, expert_ids))
    else:
        a = _masked(a, expert_keep_mask(a, thresholds, expert_ids))
    return torch.bmm(a, b)


@sparse_bmm.register_fake
def _(a, b, thresholds, expert_ids, weight_arg):
    return a.new_empty(a.shape[0], a.shape[1], b.shape[2])
