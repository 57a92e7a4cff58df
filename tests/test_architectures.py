"""The Hugging Face zoo with no model code: calibrate, attach, compile, compare (tiny random configs).

Each architecture compiles once; calibration runs for all three methods (cheap). Inductor's C++
code generation costs about a minute per model on this CPU, so the zoo lowers the rewritten graph
with AOT autograd's eager lowering (the pass, the threshold inputs and the op's decomposition are
all exercised), and one architecture per linear form not covered elsewhere goes through Inductor
(``linear``: test_backend; ``addmm``: GPT-2 generation; ``matmul`` + bias add: falcon_rw here).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import wisparse_compile as wsc
from tests.archs import DENSE, LAYERS, MOE_ARCHS, Arch
from tests.conftest import token_batches
from tests.helpers import MaskingHooks
from wisparse_compile.backend import COMPILED_REPORTS
from wisparse_compile.config import METHODS
from wisparse_compile.reference import masked_linears

IDS = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(7))
INDUCTOR = {"falcon_rw"}
EXPERTS_DENSE = "stacked expert weights (bmm / grouped mm): not supported yet"


def _calibrate_all_methods(model: torch.nn.Module) -> dict[str, wsc.SparsityPlan]:
    batches = token_batches(1, batch=2, length=16)
    plans = {m: wsc.calibrate(model, batches, wsc.SparsityConfig(sparsity=0.5, method=m)) for m in METHODS}
    names = {m: sorted(p.names) for m, p in plans.items()}
    assert names["teal"] == names["wina"] == names["wisparse"]
    params = dict(model.named_parameters())
    for name in plans["teal"].names:
        weight = params.get(f"{name}.weight", params.get(name))
        in_dim = plans["teal"].in_dims[name]
        assert weight is not None and weight.dim() == 2, name
        assert plans["teal"].channel_thresholds[name].shape == (weight.shape[in_dim],), name
    return plans


@pytest.fixture
def lowering(monkeypatch, request):
    """Lower with AOT eager instead of Inductor unless the architecture is in INDUCTOR."""
    from torch._dynamo.backends.debugging import aot_eager
    import torch._inductor.compile_fx as compile_fx_module

    arch = request.node.callspec.params["arch"]
    if arch.name not in INDUCTOR:
        monkeypatch.setattr(compile_fx_module, "compile_fx", lambda gm, inputs, config_patches=None: aot_eager(gm, inputs))
    return "inductor" if arch.name in INDUCTOR else "aot_eager"


def _compile_and_check(arch: Arch, model: torch.nn.Module, plan: wsc.SparsityPlan):
    """Compile fullgraph; compiled == eager masked reference; one graph, no break; coverage printed."""
    counters.clear()
    first = len(COMPILED_REPORTS)
    with torch.no_grad():
        dense = model(IDS).logits
        out = torch.compile(model, backend="wisparse", fullgraph=True)(IDS).logits
        with masked_linears():
            ref = model(IDS).logits
        with MaskingHooks(model, plan.channel_thresholds):  # independent of the package's masking
            ref_hooks = model(IDS).logits
    reports = COMPILED_REPORTS[first:]
    assert len(reports) == 1 and counters["stats"]["unique_graphs"] == 1, "expected one graph"
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    report = reports[0]
    sparse = sorted(d.name for d in report.decisions if d.decision == "sparse")
    dense_left = [(d.name or d.form, d.reason) for d in report.decisions if d.decision == "dense"]
    print(f"\n{arch.name}: planned {len(plan.names)} / rewritten {len(sparse)} / left dense {len(dense_left)}: {dense_left}")
    assert sparse == sorted(plan.names), report.summary()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, ref_hooks, rtol=1e-4, atol=1e-4)
    assert (out - dense).abs().max() > 1e-3, "sparsity did not change the output"
    return report, dense_left


@pytest.mark.slow
@pytest.mark.parametrize("arch", DENSE, ids=lambda a: a.name)
def test_dense_architecture(arch: Arch, lowering: str):
    model = arch.build()
    plans = _calibrate_all_methods(model)
    assert len(plans["wisparse"].names) >= 4 * LAYERS  # qkv, o, up, down (fused or not) per layer
    wsc.attach(model, plans["wisparse"])
    _, dense_left = _compile_and_check(arch, model, plans["wisparse"])
    # only the (unplanned) output head stays dense
    assert [reason for _, reason in dense_left] == ["no plan entry"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", MOE_ARCHS, ids=lambda a: a.name)
def test_moe_architecture_experts_stay_dense(arch: Arch, lowering: str, caplog):
    """Attention, routers and shared experts go sparse; stacked 3-D experts are NOT sparsified yet:
    they stay dense and the report says so (explicitly, not skipped)."""
    model = arch.build(experts_implementation="eager")
    plans = _calibrate_all_methods(model)
    assert not any(p.dim() == 3 for n, p in model.named_parameters() if n.removesuffix(".weight") in plans["teal"].names)
    with caplog.at_level("WARNING", logger="wisparse_compile.experts"):
        wsc.attach(model, plans["wisparse"])
    assert model.config._experts_implementation == "grouped_mm"
    assert any("'eager' experts implementation" in r.getMessage() for r in caplog.records)
    _, dense_left = _compile_and_check(arch, model, plans["wisparse"])
    experts = [reason for _, reason in dense_left if reason != "no plan entry"]
    assert experts == [EXPERTS_DENSE] * (2 * LAYERS), dense_left  # gate_up and down per layer, dense
