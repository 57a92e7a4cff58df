"""The quantized weight tensors (``quant/tensors.py``): eager computation with the dequantized values,
their checks, and layout-keeping copies that keep the weight's plan slot. (The compiled path: test_model.py.)"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wisparse_compile.planned import PLAN_ATTRIBUTE
from wisparse_compile.quant.primitives import quantize_int4
from wisparse_compile.quant.tensors import Int4Weight, Int8Weight


def test_int4_weight_checks_its_output_count_and_group_scales():
    q, s = quantize_int4(torch.randn(40, 8))
    with pytest.raises(ValueError, match="41 outputs take 21 bytes per row"):
        Int4Weight(q, s, torch.float32, 41)
    with pytest.raises(ValueError, match="scale must be fp32 of shape \\[8, 2\\]"):
        Int4Weight(q, s[:, :1].contiguous(), torch.float32, 40)


@pytest.mark.parametrize("cls", [Int8Weight, Int4Weight])
def test_layout_keeping_copies_keep_the_plan_slot_others_compute_dequantized(cls):
    weight = cls.from_float(torch.randn(40, 8))
    setattr(weight, PLAN_ATTRIBUTE, "slot")
    for copy in (weight.detach(), weight.clone(), weight.to(torch.bfloat16)):
        assert type(copy) is cls and getattr(copy, PLAN_ATTRIBUTE) == "slot"
    assert weight.to(torch.bfloat16).dtype == torch.bfloat16
    plain = weight * 1
    assert type(plain) is torch.Tensor and torch.equal(plain, weight.dequantize())


@pytest.mark.parametrize("weight_type", [Int8Weight, Int4Weight])
def test_quantized_weight_computes_with_the_dequantized_values_in_eager_code(weight_type):
    fmt = weight_type.FORMAT
    w = torch.randn(33, 32)  # odd out: int4's spare nibble
    qw = weight_type.from_float(w)
    deq = qw.dequantize()
    x = torch.randn(3, 32)
    assert qw.shape == (33, 32) and qw.dtype == torch.float32 and qw.stride() == (1, 33) and qw.out_features == 33
    torch.testing.assert_close(F.linear(x, qw), F.linear(x, deq))
    torch.testing.assert_close(x @ qw.t(), x @ deq.t())
    torch.testing.assert_close(torch.addmm(torch.zeros(33), x, qw.T), x @ deq.t())
    assert isinstance(qw.detach(), weight_type) and qw.detach().out_features == 33
    assert isinstance(copy.deepcopy(nn.Parameter(qw, requires_grad=False)), weight_type)
    half = qw.to(torch.bfloat16)
    assert isinstance(half, weight_type) and half.dtype == torch.bfloat16 and torch.equal(half.qdata, qw.qdata)
    with pytest.raises(RuntimeError, match=f"{fmt}-quantized weight .* detach\\(model\\) first"):
        with torch.no_grad():
            qw.copy_(w)
