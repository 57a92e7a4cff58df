"""Linears under autocast stay dense: the sparse op has no autocast rule (precision would change)."""

import pytest
import torch
from torch import nn

import wisparse_compile as wsc
from wisparse_compile.backend import COMPILED_REPORTS


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, x, inner_autocast: bool = False):
        if inner_autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.forward(x)
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("where", ["caller", "inside the model"])
def test_autocast_leaves_linears_dense(where):
    torch.manual_seed(0)
    model = _Model().eval()
    wsc.attach(model, wsc.calibrate(model, [torch.randn(8, 16)], wsc.SparsityConfig(sparsity=0.5, method="wina")))
    x = torch.randn(2, 16)
    compiled = torch.compile(model, backend="wisparse")
    with torch.no_grad():
        if where == "caller":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out, ref = compiled(x), model(x)
        else:
            out, ref = compiled(x, inner_autocast=True), model(x, inner_autocast=True)
    report = COMPILED_REPORTS[-1]
    assert report.rewritten == 0
    assert any("autocast" in d.reason for d in report.decisions)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)  # dense, as eager autocast computes it
