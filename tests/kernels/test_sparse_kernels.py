"""The route table (``kernels/sparse_kernels.py``): a route per (layout, device, rows), the masked dense
route where no entry takes a call (said once for a Triton device with no kernel for the layout), and a
kernel is one entry."""

import logging

import torch

from tests.kernels.operands import linear_operands
from wisparse_compile.kernels import KERNELS, Layout, Route, route_of, sparse_kernels, triton_route
from wisparse_compile.kernels.cpu_sparse_gemv import cpu_kernel_available
from wisparse_compile.quant.primitives import quantize_int4, quantize_int8


def _quantized(m=1, n=40, k=50):
    x, w, b, t = linear_operands(m, n, k, 0.5, torch.float32)
    (q8, s8), (q4, s4) = quantize_int8(w), quantize_int4(w)
    return x, w, q8, q4


def test_every_layout_routes_by_device_rows_and_dtype():
    x, w, q8, q4 = _quantized()
    cpu = Route.CPU_KERNEL if cpu_kernel_available() else Route.MASKED_DENSE
    for layout, weight in ((Layout.FLOAT, w), (Layout.INT8, q8), (Layout.INT4, q4)):
        assert route_of(x, weight, layout, 8) == cpu
        assert route_of(torch.randn(9, 50), weight, layout, 8) == Route.MASKED_DENSE  # prefill
        assert route_of(x.half(), weight, layout, 8) == Route.MASKED_DENSE  # no fp16 CPU kernel
        assert route_of(x.to(torch.int32), weight, layout, 8) == Route.MASKED_DENSE
    assert route_of(x, w.t().contiguous(), Layout.FLOAT, 8) == Route.MASKED_DENSE  # output-major float weight


def test_triton_devices_route_every_layout_to_its_triton_gemv(monkeypatch):
    """float, int8 and int4 each have a Triton GEMV; the int4 one, run directly, matches the reference
    (the kernels themselves: test_triton_sparse_gemv.py)."""
    from tests.kernels.operands import assert_matches
    from wisparse_compile.kernels import sparse_linear_reference
    from wisparse_compile.kernels.sparse_kernels import sparse_gemv_int4

    x, w, b, t = linear_operands(3, 40, 50, 0.5, torch.float32)
    q4, s4 = quantize_int4(w)
    monkeypatch.setattr(triton_route, "TRITON_DEVICES", ("cuda", "cpu"))
    for layout, weight in ((Layout.FLOAT, w), (Layout.INT8, quantize_int8(w)[0]), (Layout.INT4, q4)):
        assert route_of(x, weight, layout, 8) == Route.TRITON
    assert_matches(sparse_gemv_int4(x, q4, s4, 40, b, t), sparse_linear_reference(x, q4, b, t, "int4", s4, 40), torch.float32)


def test_a_layout_without_a_triton_kernel_takes_masked_dense_and_says_so_once(monkeypatch, caplog):
    """Where the table has no Triton entry for a layout, its decode calls mask and run dense, with one warning."""
    x, w, q8, q4 = _quantized()
    monkeypatch.setattr(triton_route, "TRITON_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(sparse_kernels, "_logged_missing", set())
    monkeypatch.delitem(KERNELS, (Layout.INT4, sparse_kernels.TRITON))
    with caplog.at_level(logging.WARNING, logger="wisparse_compile.kernels.sparse_kernels"):
        assert route_of(x, q4, "int4", 8) == Route.MASKED_DENSE
        assert route_of(x, q4, "int4", 8) == Route.MASKED_DENSE
    assert caplog.text.count("no Triton kernel for int4 weights exists yet") == 1
    assert route_of(x, q8, "int8", 8) == Route.TRITON and route_of(x, w, "float", 8) == Route.TRITON


def test_a_route_is_one_table_entry(monkeypatch):
    """A kernel is one entry of the route table, keyed by (layout, device): replacing it reroutes."""
    x, w, q8, q4 = _quantized()
    monkeypatch.setattr(triton_route, "TRITON_DEVICES", ("cuda", "cpu"))
    entry = sparse_kernels.SparseKernel(Route.TRITON, lambda x, weight, rows: rows >= 1, lambda *args: None)
    monkeypatch.setitem(KERNELS, (Layout.INT4, sparse_kernels.TRITON), entry)
    assert route_of(x, q4, "int4", 8) == Route.TRITON
    assert sparse_kernels.kernel_for(x, q4, Layout.INT4, 8) is entry
