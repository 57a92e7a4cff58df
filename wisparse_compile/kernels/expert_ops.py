"""Sparse contractions of stacked expert weights: ``wisparse::sparse_grouped_mm`` and ``sparse_bmm``.

Semantics: each row of the activation belongs to one expert and is masked by that expert's
thresholds ``thresholds[e]`` as ``wisparse_compile.mask`` defines, then the
original contraction runs unchanged. The expert of a row comes from ``offs`` for grouped mm (rows
are sorted by expert; ``offs`` are the cumulative row counts) and from the gathered ``expert_ids``
for bmm on ``W[expert_ids]``.

Both ops are opaque custom ops (as transformers' own grouped-mm fallback is): the grouped
contraction loops over data-dependent group sizes, which Inductor cannot trace. Their bodies are
the plain-torch reference; a Triton kernel can take the same op later.

Host syncs: ``sparse_bmm`` and the ``torch._grouped_mm`` route read no device value. The loop
over groups (dtypes ``_grouped_mm`` does not take) needs the group sizes on the host
(``offs.tolist()``), which CUDA-graph capture forbids; so on accelerators, a call with no more rows
than experts (decode: batch x top-k rows) contracts each row with its gathered expert weight
instead (``torch.bmm`` on ``weight[expert_of_row]``): no sync, and no more weight traffic than one
pass over the experts the rows use.
"""

from __future__ import annotations

import torch

from ..mask import expert_of_rows, masked_input


def sync_free_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the non-native grouped mm takes the gathered (sync-free) route: off the CPU, at most E rows."""
    return x.device.type != "cpu" and x.shape[0] <= weight.shape[0]


def grouped_mm_gathered(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Grouped mm row by row on each row's gathered expert weight; no host sync. Rows past
    ``offs[-1]`` (no expert) are zero, as in the loop."""
    rows = x.shape[0]
    experts = expert_of_rows(offs, rows, weight.shape[0])
    out = torch.bmm(x.unsqueeze(1), weight[experts]).squeeze(1)
    routed = torch.arange(rows, device=x.device) < offs[-1]
    return torch.where(routed.unsqueeze(1), out, torch.zeros((), dtype=out.dtype, device=out.device))


def grouped_mm_dense(
    x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, native: bool, sync_free: bool = False
) -> torch.Tensor:
    """``x[rows of group e] @ weight[e]`` for each group: ``torch._grouped_mm``, the gathered
    sync-free route, or a loop over groups (whose sizes it reads on the host)."""
    if native:
        return torch._grouped_mm(x, weight, offs=offs)
    if sync_free:
        return grouped_mm_gathered(x, weight, offs)
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
    masked = masked_input(x, thresholds, rows)
    return grouped_mm_dense(masked, weight, offs, native, sync_free=sync_free_rows(x, weight))


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
        b = masked_input(b, thresholds, expert_ids)
    else:
        a = masked_input(a, thresholds, expert_ids)
    return torch.bmm(a, b)


@sparse_bmm.register_fake
def _(a, b, thresholds, expert_ids, weight_arg):
    return a.new_empty(a.shape[0], a.shape[1], b.shape[2])
