"""The quantized weight tensors (``quant/tensors.py``): their checks, and layout-keeping copies that keep
the weight's plan slot. (Eager computation and the compiled path: tests/test_quantize.py.)"""

import pytest
import torch

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
