"""The routing vocabulary (``kernels/routing.py``): routes and layouts compare as their names, and what
decode-sized means for static, symbolic and data-dependent row counts."""

import pytest
import torch
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from wisparse_compile.kernels.routing import DEFAULT_MAX_SPARSE_ROWS, Layout, Route, decode_sized, token_rows


def test_routes_and_layouts_compare_equal_to_their_values():
    assert [r.value for r in Route] == ["dense", "triton", "cpu_kernel", "masked_dense"]
    assert [layout.value for layout in Layout] == ["float", "int8", "int4"]
    assert Route.CPU_KERNEL == "cpu_kernel" and Route("masked_dense") is Route.MASKED_DENSE
    assert Layout.INT4 == "int4" and Layout("float") is Layout.FLOAT
    with pytest.raises(ValueError):
        Route("sparse")


@pytest.mark.parametrize("shape, rows", [((4,), 1), ((3, 4), 3), ((2, 5, 4), 10), ((0, 4), 0)])
def test_token_rows_multiply_every_leading_dim(shape, rows):
    assert token_rows(torch.empty(shape)) == rows


def test_token_rows_of_a_scalar_or_no_features_is_zero():
    assert token_rows(torch.empty(())) == 0 and token_rows(torch.empty(3, 0)) == 0 and token_rows(torch.empty(5)) == 1


def test_decode_sized_static_counts():
    assert DEFAULT_MAX_SPARSE_ROWS == 8
    assert decode_sized(torch.empty(8, 16), 8) and decode_sized(torch.empty(2, 4, 16), 8)
    assert not decode_sized(torch.empty(9, 16), 8) and not decode_sized(torch.empty(3, 3, 16), 8)
    assert not decode_sized(torch.empty(1, 0), 8)  # no input channels: nothing for a sparse kernel


def _symbolic_rows(rows: int):
    """A fake [rows, 4] tensor whose row count is a symbol (hint ``rows``), and its shape environment."""
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env, static_shapes=False)
    context = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
    x = mode.from_tensor(torch.empty(rows, 4), source=ConstantSource("x"), symbolic_context=context)
    assert isinstance(x.shape[0], torch.SymInt)
    return x, env


@pytest.mark.parametrize("rows, max_rows, expected, guard", [(3, 8, True, "<= 8"), (3, 2, False, "> 2")])
def test_a_symbolic_row_count_is_decided_on_its_hint_and_guarded(rows, max_rows, expected, guard):
    """The compiled graph then serves only the side of ``max_rows`` its hint was on."""
    x, env = _symbolic_rows(rows)
    assert decode_sized(x, max_rows) is expected
    assert [str(g.expr) for g in env.guards] == [f"{x.shape[0]} {guard}"]


def test_a_data_dependent_row_count_is_not_decode_sized():
    env = ShapeEnv()
    with FakeTensorMode(shape_env=env):
        x = torch.empty(env.create_unbacked_symint(), 4)
    assert decode_sized(x, 8) is False and not env.guards
