"""``mask``: which input channels a sparse linear keeps (the one definition every route follows)."""

import torch

from wisparse_compile.mask import apply_keep, expert_keep_mask, expert_of_rows, keep_mask, masked_input


def test_a_channel_is_kept_iff_its_magnitude_exceeds_its_threshold():
    x = torch.tensor([[0.5, -0.5, 0.2, -2.0]])
    t = torch.tensor([0.4, 0.5, 0.3, 1.0])
    assert keep_mask(x, t).tolist() == [[True, False, False, True]]  # -0.5 at 0.5: not strictly above
    assert masked_input(x, t).tolist() == [[0.5, 0.0, 0.0, -2.0]]


def test_nan_is_kept_and_inf_passes_every_threshold():
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0])
    kept = masked_input(x, torch.full((4,), 1.0))
    assert kept[0].isnan() and kept[1] == float("inf") and kept[2] == float("-inf") and kept[3] == 0.0
    assert masked_input(x, torch.full((4,), float("inf")))[0].isnan()  # never "pruned" to 0


def test_low_precision_inputs_compare_in_fp32_and_keep_their_dtype():
    x = torch.tensor([0.1001, 0.0999], dtype=torch.bfloat16)  # both round to 0.10009765625 in bf16
    t = torch.tensor([0.1, 0.1], dtype=torch.float32)
    assert keep_mask(x, t).tolist() == [True, True]  # 0.10009765625 > 0.1 in fp32; rounded to bf16, 0.1 would tie
    out = masked_input(x, torch.tensor([0.2, 0.0]))
    assert out.dtype == torch.bfloat16 and out.tolist() == [0.0, x[1].item()]


def test_apply_keep_zeroes_the_dropped_channels_only():
    x = torch.randn(2, 3, 4)
    keep = torch.rand(2, 3, 4) > 0.5
    out = apply_keep(x, keep)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out[keep], x[keep]) and bool((out[~keep] == 0).all())


def test_expert_of_rows_reads_cumulative_offsets():
    offs = torch.tensor([2, 2, 5])  # expert 0: rows 0-1, expert 1: none, expert 2: rows 2-4
    assert expert_of_rows(offs, 7, 3).tolist() == [0, 0, 2, 2, 2, 2, 2]  # rows past the end: the last expert


def test_each_row_is_compared_with_its_experts_thresholds_in_any_row_major_layout():
    thresholds = torch.tensor([[0.0, 0.0], [1.0, 1.0]])  # expert 0 keeps everything, expert 1 prunes < 1
    x = torch.tensor([[0.5, 2.0], [0.5, 2.0], [0.5, 0.1]])
    experts = torch.tensor([0, 1, 1])
    expected = [[True, True], [False, True], [False, False]]
    assert expert_keep_mask(x, thresholds, experts).tolist() == expected
    assert expert_keep_mask(x.unsqueeze(-1), thresholds, experts).squeeze(-1).tolist() == expected  # [S, in, 1]
    assert expert_keep_mask(x.unsqueeze(1), thresholds, experts).squeeze(1).tolist() == expected  # [S, 1, in]
    shared = torch.tensor([1.0, 0.0])  # 1-D thresholds: one set for every row, experts ignored
    assert expert_keep_mask(x, shared, experts).tolist() == [[False, True]] * 3
    assert masked_input(x, thresholds, experts).tolist() == [[0.5, 2.0], [0.0, 2.0], [0.0, 0.0]]
