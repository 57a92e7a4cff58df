"""The input-major layout: same values, one contiguous row per input channel, 16-byte rows on CUDA."""

import pytest
import torch

from wisparse_compile.kernels import layout


@pytest.mark.parametrize("dtype, out, expected", [
    (torch.bfloat16, 4100, 4104), (torch.float16, 4096, 4096), (torch.float32, 33, 36), (torch.int8, 17, 32),
])
def test_padded_row_length_on_cuda_is_a_16_byte_multiple(monkeypatch, dtype, out, expected):
    weight = torch.empty(out, 4, dtype=dtype, device="meta")
    assert layout.padded_row_length(weight) == out  # not CUDA: dense rows
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda")))
    assert layout.padded_row_length(weight) == expected
    assert expected * weight.element_size() % layout.ROW_ALIGN_BYTES == 0


def test_input_major_keeps_values_and_pads_rows(monkeypatch):
    weight = torch.randn(10, 6)
    dense = layout.input_major(weight)
    assert dense.stride() == (1, 10) and torch.equal(dense, weight)
    monkeypatch.setattr(layout, "padded_row_length", lambda w: 12)  # as on CUDA for fp32 [10, 6]
    padded = layout.input_major(weight)
    assert padded.stride() == (1, 12) and torch.equal(padded, weight)
    assert padded.untyped_storage().nbytes() == 6 * 12 * 4
