"""Sparse contractions of stacked expert weights: the ``wisparse::sparse_experts`` op, beside its reference.

Semantics: each row of the activation belongs to one expert and is masked by that expert's
thresholds ``thresholds[e]`` as ``wisparse_compile.mask`` defines, then the
original contraction runs unchanged. The expert of a row comes from ``offs`` for grouped mm (rows
are sorted by expert; ``offs`` are the cumulative row counts) and from the gathered ``expert_ids``
for bmm on ``W[expert_ids]``.

The op is an opaque custom op (as transformers' own grouped-mm fallback is): the grouped
contraction loops over data-dependent group sizes, which Inductor cannot trace. Its body is
the plain-torch reference; a Triton kernel can take the same op later.

Host syncs: the bmm forms and the ``torch._grouped_mm`` route read no device value. The loop
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


#: The contractions ``sparse_experts`` takes: (a, b, routing) per form.
EXPERT_FORMS = ("grouped_mm", "grouped_mm_native", "bmm_weight_first", "bmm_weight_second")


def sparse_experts_reference(
    a: torch.Tensor, b: torch.Tensor, thresholds: torch.Tensor, routing: torch.Tensor, form: str
) -> torch.Tensor:
    """The definition of ``sparse_experts``: mask the activation operand row by row by its expert's
    thresholds, then the original contraction (the grouped mm as a loop over groups)."""
    if form in ("grouped_mm", "grouped_mm_native"):
        masked = masked_input(a, thresholds, expert_of_rows(routing, a.shape[0], b.shape[0]))
        return grouped_mm_dense(masked, b, routing, native=False)
    if form == "bmm_weight_first":
        return torch.bmm(a, masked_input(b, thresholds, routing))
    return torch.bmm(masked_input(a, thresholds, routing), b)


def _check_experts(a: torch.Tensor, b: torch.Tensor, thresholds: torch.Tensor, form: str) -> None:
    torch._check(form in EXPERT_FORMS, lambda: f"sparse_experts: unknown form {form!r}; known: {list(EXPERT_FORMS)}")
    if form.startswith("grouped_mm"):
        torch._check(b.dim() == 3 and thresholds.shape == (b.shape[0], b.shape[1]),
                     lambda: f"sparse_experts: thresholds {tuple(thresholds.shape)} do not fit weight {tuple(b.shape)}")


@torch.library.custom_op("wisparse::sparse_experts", mutates_args=())
def sparse_experts(
    a: torch.Tensor, b: torch.Tensor, thresholds: torch.Tensor, routing: torch.Tensor, form: str
) -> torch.Tensor:
    """A contraction of stacked expert weights whose activation rows are masked by their expert's
    thresholds [E, in]. Forms (``EXPERT_FORMS``):

    - ``grouped_mm`` / ``grouped_mm_native``: expert-sorted ``a`` [S, in] with ``b`` [E, in, out],
      ``routing`` the cumulative row counts ``offs``; native contracts with ``torch._grouped_mm``
      (else a loop, or the sync-free gathered route off the CPU);
    - ``bmm_weight_first`` / ``bmm_weight_second``: ``torch.bmm(a, b)`` where ``a`` (first) or ``b``
      (second) is the gathered ``W[expert_ids]`` and the other operand the activation ([S, in, 1] or
      [S, 1, in]), ``routing`` the ``expert_ids``.
    """
    _check_experts(a, b, thresholds, form)
    if form.startswith("grouped_mm"):
        masked = masked_input(a, thresholds, expert_of_rows(routing, a.shape[0], b.shape[0]))
        return grouped_mm_dense(masked, b, routing, form == "grouped_mm_native", sync_free=sync_free_rows(a, b))
    return sparse_experts_reference(a, b, thresholds, routing, form)


@sparse_experts.register_fake
def _(a, b, thresholds, routing, form):
    if form.startswith("grouped_mm"):
        return a.new_empty(a.shape[0], b.shape[2])
    return a.new_empty(a.shape[0], a.shape[1], b.shape[2])
