"""The quantizers (``quant/primitives.py``): int8 symmetric per output channel, int4 grouped along the
outputs and packed as documented, both refusing weights no code represents."""

import pytest
import torch

from wisparse_compile.quant.primitives import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8


def test_quantize_int8_is_symmetric_per_output_channel():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g) * torch.linspace(0.1, 3, 24)[:, None]
    w[5] = 0  # a zero row: scale 1, zero codes
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == (40, 24) and q.is_contiguous() and s.shape == (24,)
    assert q.abs().max() <= 127 and (q.abs().amax(0)[torch.arange(24) != 5] == 127).all()
    assert s[5] == 1 and (q[:, 5] == 0).all()
    err = (dequantize_int8(q, s) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-6).all()  # round to nearest: at most half a step per channel


def test_quantize_int4_groups_32_outputs_per_input_channel_and_packs_the_documented_nibbles():
    g = torch.Generator().manual_seed(0)
    n, k = 75, 6  # two full 32-output blocks and a partial one of 11 (h = 6: a spare high nibble)
    w = torch.randn(n, k, generator=g) * torch.linspace(0.1, 3, n)[:, None]
    w[32:64, 2] = 0  # a zero group: scale 1, zero codes
    q, s = quantize_int4(w)
    assert q.dtype == torch.uint8 and q.shape == (k, 38) and q.is_contiguous()
    assert s.dtype == torch.float32 and s.shape == (k, 3) and s[2, 1] == 1
    steps = s.repeat_interleave(32, dim=1)[:, :n]
    codes = torch.round(w.t() / steps).clamp(-8, 7).to(torch.int64)
    nib = codes & 0xF
    assert (codes[2, 32:64] == 0).all()
    # block 0: byte b = output b (low) | output b + 16 (high); the partial block: h = 6
    assert torch.equal(q[:, :16].long(), nib[:, :16] | (nib[:, 16:32] << 4))
    assert torch.equal(q[:, 32:37].long(), nib[:, 64:69] | (nib[:, 70:75] << 4))
    assert torch.equal(q[:, 37].long(), nib[:, 69])  # the spare high nibble is zero
    deq = dequantize_int4(q, s, n)
    assert torch.equal(deq, (codes * steps).t())
    # each group's scale is the least-squares choice among max|W|/6..9, so no worse than max|W|/7 (no clipping)
    sq = lambda a: a.t().reshape(k, -1).square()  # noqa: E731
    for gi, (lo, hi) in enumerate(((0, 32), (32, 64), (64, 75))):
        plain = (w[lo:hi].abs().amax(0) / 7).clamp_min(1e-30)
        plain_err = ((torch.round(w[lo:hi] / plain) * plain - w[lo:hi]) ** 2).sum(0)
        assert ((deq[lo:hi] - w[lo:hi]) ** 2).sum(0).le(plain_err + 1e-6).all(), gi
    assert (deq - w).abs().max() <= 2 * s.max() + 1e-6  # clipping at max|W|/9 costs at most two steps


@pytest.mark.parametrize(("fmt", "quantize"), [("int8", quantize_int8), ("int4", quantize_int4)])
def test_quantizers_reject_bad_weights(fmt, quantize):
    with pytest.raises(ValueError, match=f"{fmt} quantization takes a 2-D"):
        quantize(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=f"{fmt} quantization takes a floating-point"):
        quantize(torch.ones(2, 3, dtype=torch.int32))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="NaN or Inf"):
            quantize(torch.tensor([[1.0, bad]]))
