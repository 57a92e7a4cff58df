"""Per weight layout (``kernels/formats.py``): the one operand check names each problem, the reference is
the dense linear on the weight the operands stand for, and the masked dense route equals it."""

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.operands import assert_matches, linear_operands
from wisparse_compile.kernels import Layout, formats
from wisparse_compile.mask import masked_input
from wisparse_compile.quant.primitives import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8


def _operands(layout: Layout, m=3, n=40, k=24, dtype=torch.float32):
    """x, the weight operand, scale, out_features, bias, thresholds of one linear in ``layout``."""
    x, w, b, t = linear_operands(m, n, k, 0.5, dtype)
    if layout is Layout.FLOAT:
        return x, w, None, None, b, t, w
    q, s = (quantize_int8 if layout is Layout.INT8 else quantize_int4)(w.float())
    dense = dequantize_int8(q, s, dtype) if layout is Layout.INT8 else dequantize_int4(q, s, n, dtype)
    return x, q, s, (n if layout is Layout.INT4 else None), b, t, dense


@pytest.mark.parametrize("layout", list(Layout))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_and_masked_dense_are_the_dense_linear_on_the_weight(layout, dtype):
    x, w, s, n, b, t, dense = _operands(layout, m=12, dtype=dtype)
    assert formats.check_operands("op", x, w, t, layout, s, n) == 40
    expected = F.linear(masked_input(x.float(), t), dense.float(), b.float())
    assert_matches(formats.reference(x, w, b, t, layout, s, n), expected, dtype)
    assert_matches(formats.masked_dense(x, w, b, t, layout, s, n), expected, dtype)
    if layout is not Layout.FLOAT:  # thresholds None: a dense quantized linear
        assert_matches(formats.masked_dense(x, w, b, None, layout, s, n), F.linear(x.float(), dense.float(), b.float()), dtype)


def test_operand_checks_name_the_problem():
    x, w, _, _, b, t, _ = _operands(Layout.FLOAT)
    with pytest.raises(RuntimeError, match="op: a float weight takes no scale"):
        formats.check_operands("op", x, w, t, Layout.FLOAT, torch.ones(40))
    with pytest.raises(RuntimeError, match="op: a float weight needs thresholds"):
        formats.check_operands("op", x, w, None, Layout.FLOAT)
    with pytest.raises(RuntimeError, match="op: input has 23 channels, weight expects 24"):
        formats.check_operands("op", x[:, :23], w, t, Layout.FLOAT)
    with pytest.raises(RuntimeError, match="thresholds must be floating point"):
        formats.check_operands("op", x, w, t.long(), Layout.FLOAT)
    x, q, s, _, _, t, _ = _operands(Layout.INT8)
    with pytest.raises(RuntimeError, match="op: scale must be 1-D of length 40, got None"):
        formats.check_operands("op", x, q, t, Layout.INT8)
    x, q, s, n, _, t, _ = _operands(Layout.INT4)
    with pytest.raises(RuntimeError, match="int4 weights need out_features"):
        formats.check_operands("op", x, q, t, Layout.INT4, s)
    with pytest.raises(ValueError, match="unknown weight layout 'int2'; known: \\['float', 'int8', 'int4'\\]"):
        formats.layout_named("int2")
