"""The stacked-expert op (``sparse_experts``) against its definition (mask each row by its expert's thresholds, then
the original contraction), and the sync-free decode route of the grouped mm."""

import pytest
import torch

from tests.kernels.test_linear_op import NoHostSync
from wisparse_compile.kernels import expert_of_rows, sparse_experts, sparse_experts_reference
from wisparse_compile.kernels.expert_ops import grouped_mm_dense, grouped_mm_gathered, sync_free_rows
from wisparse_compile.mask import masked_input


def _experts(rows, experts=4, k=24, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    weight = torch.randn(experts, k, n, generator=g)
    thresholds = torch.rand(experts, k, generator=g)
    return x, weight, thresholds


def _loop_reference(x, weight, offs):
    out = torch.zeros(x.shape[0], weight.shape[2])
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = x[start:end] @ weight[e]
        start = end
    return out


@pytest.mark.parametrize("offs", [[1, 1, 3, 3], [0, 2, 2, 4], [1, 2, 3, 3]])  # empty groups; rows past offs[-1]
def test_gathered_route_equals_the_loop_and_never_syncs(offs):
    x, weight, thresholds = _experts(4)
    offs = torch.tensor(offs, dtype=torch.int32)
    with NoHostSync():
        out = grouped_mm_gathered(x, weight, offs)
    torch.testing.assert_close(out, _loop_reference(x, weight, offs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, grouped_mm_dense(x, weight, offs, native=False), rtol=1e-5, atol=1e-5)


def test_masking_of_expert_rows_never_syncs():
    x, weight, thresholds = _experts(4)
    offs = torch.tensor([1, 3, 3, 4], dtype=torch.int32)
    with NoHostSync():
        masked = masked_input(x, thresholds, expert_of_rows(offs, 4, 4))
        sparse_experts(x.unsqueeze(1), weight[torch.tensor([0, 1, 1, 3])], thresholds, torch.tensor([0, 1, 1, 3]),
                       "bmm_weight_second")
    assert torch.equal(masked[0] != 0, (x[0].abs() > thresholds[0]))


def test_sync_free_route_is_taken_off_the_cpu_for_decode_rows():
    x, weight, _ = _experts(4)
    assert not sync_free_rows(x, weight)  # CPU: the loop (its sync is free)
    meta_x, meta_w = x.to("meta"), weight.to("meta")
    assert sync_free_rows(meta_x, meta_w)  # 4 rows, 4 experts
    assert not sync_free_rows(torch.empty(5, 24, device="meta"), meta_w)  # prefill-sized: the loop


@pytest.mark.parametrize("rows", [3, 9])
def test_sparse_grouped_mm_masks_each_row_by_its_expert(rows):
    x, weight, thresholds = _experts(rows)
    x[0, 2] = float("nan")
    offs = torch.tensor([1, rows // 2, rows // 2, rows], dtype=torch.int32)
    out = sparse_experts(x, weight, thresholds, offs, "grouped_mm")
    experts = expert_of_rows(offs, rows, 4)
    masked = torch.where((x.abs() > thresholds[experts]) | x.isnan(), x, 0.0)
    ref = _loop_reference(masked, weight, offs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert out[0].isnan().all()
    torch.testing.assert_close(sparse_experts_reference(x, weight, thresholds, offs, "grouped_mm"), ref, rtol=1e-5, atol=1e-5,
                               equal_nan=True)


def test_sparse_bmm_masks_the_activation_operand():
    x, weight, thresholds = _experts(3)
    ids = torch.tensor([2, 0, 2])
    out = sparse_experts(x.unsqueeze(1), weight[ids], thresholds, ids, "bmm_weight_second")
    ref = torch.bmm(torch.where(x.abs() > thresholds[ids], x, 0.0).unsqueeze(1), weight[ids])
    torch.testing.assert_close(out, ref)
    out_t = sparse_experts(weight[ids].transpose(1, 2), x.unsqueeze(2), thresholds, ids, "bmm_weight_first")
    torch.testing.assert_close(out_t, ref.transpose(1, 2))


def test_unknown_form_and_misfit_thresholds_are_refused():
    x, weight, thresholds = _experts(3)
    offs = torch.tensor([1, 2, 2, 3], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="unknown form 'mm'"):
        sparse_experts(x, weight, thresholds, offs, "mm")
    with pytest.raises(RuntimeError, match="do not fit weight"):
        sparse_experts(x, weight, thresholds[:, :5], offs, "grouped_mm")
