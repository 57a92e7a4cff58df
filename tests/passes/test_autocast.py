"""Linears and stacked experts under autocast stay dense: the sparse ops have no autocast rule
(precision would change)."""

import pytest
import torch
from torch import nn

import wisparse_compile as wsc
from tests.archs import BY_NAME
from tests.conftest import token_batches
from wisparse_compile.backend import COMPILED_REPORTS
from wisparse_compile.passes.decisions import DenseReason


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
    assert any(d.reason_kind is DenseReason.AUTOCAST for d in report.decisions)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)  # dense, as eager autocast computes it


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_autocast_leaves_moe_experts_dense(lowered_graphs, implementation):
    """Stacked experts follow the same rule as plain linears: under autocast they stay dense, with
    the autocast reason, and the output is what eager autocast computes."""
    model = BY_NAME["qwen3_moe"].build(experts_implementation="eager")
    plan = wsc.calibrate(model, token_batches(1, batch=2, length=16),
                         wsc.SparsityConfig(sparsity=0.5, method="wina", allocation=wsc.Uniform()))
    wsc.attach(model, plan)
    model.set_experts_implementation(implementation)
    experts = {n for n in plan.names if n.endswith(("gate_up_proj", "down_proj")) and ".experts." in n}
    assert len(experts) == 2
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.compile(model, backend="wisparse", fullgraph=True)(ids).logits
        ref = model(ids).logits
    report = COMPILED_REPORTS[-1]
    assert report.rewritten == 0, report.summary()
    kinds = {d.name: d.reason_kind for d in report.decisions if d.name in experts}
    assert set(kinds) == experts
    # the first expert contraction reads fp32 activations: autocast is why it stays dense (the
    # later one may already read autocast's bf16 output: a dtype mismatch)
    assert DenseReason.AUTOCAST in kinds.values()
    assert set(kinds.values()) <= {DenseReason.AUTOCAST, DenseReason.DTYPE_MISMATCH}
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
