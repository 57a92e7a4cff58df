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
from tests.archs import DENSE, HYBRID_ARCHS, JETMOE, LAYERS, MOE_ARCHS, Arch
from tests.conftest import token_batches
from tests.helpers import MaskingHooks
from wisparse_compile.attach import unplanned
from wisparse_compile.backend import COMPILED_REPORTS
from wisparse_compile.config import METHODS
from wisparse_compile.reference import masked_linears

IDS = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(7))
INDUCTOR = {"falcon_rw"}
# How the experts reach the graph: (experts_implementation, dtype) -> the expert contraction form.
EXPERT_VARIANTS = [("grouped_mm", torch.float32), ("batched_mm", torch.float32), ("grouped_mm", torch.bfloat16)]


def _calibrate_all_methods(model: torch.nn.Module, methods=METHODS) -> dict[str, wsc.SparsityPlan]:
    batches = token_batches(1, batch=2, length=16)
    # every allocation path once: teal greedy, wisparse search + greedy, wina uniform (greedy is slow
    # on the eager experts loop, and teal covers it)
    plans = {m: wsc.calibrate(model, batches, wsc.SparsityConfig(sparsity=0.5, method=m, allocation=wsc.Uniform() if m == "wina" else None))
             for m in methods}
    names = {m: sorted(p.names) for m, p in plans.items()}
    assert all(n == names[methods[0]] for n in names.values())
    params = dict(model.named_parameters())
    for name in plans[methods[0]].names:
        weight = params.get(f"{name}.weight", params.get(name))
        in_dim = plans[methods[0]].in_dims[name]
        assert weight is not None and weight.dim() in (2, 3), name
        expected = (weight.shape[in_dim],) if weight.dim() == 2 else (weight.shape[0], weight.shape[in_dim])
        assert plans[methods[0]].channel_thresholds[name].shape == expected, name
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


def _compile_and_check(arch: Arch, model: torch.nn.Module, plan: wsc.SparsityPlan, tol: float = 1e-4):
    """Compile fullgraph; compiled == eager masked reference; one graph, no break; coverage printed."""
    counters.clear()
    first = len(COMPILED_REPORTS)
    # module hooks see only [out, in] linears; stacked experts are checked against masked_linears
    linears = {n: t for n, t in plan.channel_thresholds.items() if t.dim() == 1}
    with torch.no_grad():
        dense = model(IDS).logits
        out = torch.compile(model, backend="wisparse", fullgraph=True)(IDS).logits
        with masked_linears():
            ref = model(IDS).logits
        with MaskingHooks(model, linears), masked_linears(), _only_experts(model, linears):
            ref_hooks = model(IDS).logits  # independent masking of the [out, in] linears
    reports = COMPILED_REPORTS[first:]
    assert len(reports) == 1 and counters["stats"]["unique_graphs"] == 1, "expected one graph"
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    report = reports[0]
    sparse = sorted(d.name for d in report.decisions if d.decision == "sparse")
    dense_left = [(d.name or d.form, d.reason) for d in report.decisions if d.decision == "dense"]
    print(f"\n{arch.name}: planned {len(plan.names)} / rewritten {len(sparse)} / left dense {len(dense_left)}: {dense_left}")
    assert sparse == sorted(plan.names), report.summary()
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(out, ref_hooks, rtol=tol, atol=tol)
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


def _only_experts(model: torch.nn.Module, linears: dict[str, torch.Tensor]):
    """While active, the [out, in] linears in ``linears`` are unplanned, so a surrounding
    ``masked_linears`` masks only the stacked experts."""
    params = dict(model.named_parameters())
    return unplanned([params.get(f"{n}.weight", params.get(n)) for n in linears])


@pytest.mark.slow
@pytest.mark.parametrize("arch", MOE_ARCHS, ids=lambda a: a.name)
def test_moe_architecture_experts_sparse(arch: Arch, lowering: str, caplog):
    """Stacked 3-D experts are sparse with per-expert [E, in] thresholds, in all three forms they take
    in the graph: grouped_mm_fallback (fp32), batched_mm's bmm on W[expert_ids] (fp32) and
    torch._grouped_mm (bf16). Calibration runs through transformers' "eager" experts loop (F.linear
    on W[e]); attach switches it to a traceable implementation and says so."""
    model = arch.build(experts_implementation="eager")
    # all three methods on one MoE (the allocation's refinement is slow on the eager experts loop)
    methods = METHODS if arch.name == "qwen2_moe" else ("wina",)
    plans = _calibrate_all_methods(model, methods)
    plan = plans[methods[-1]]
    params = dict(model.named_parameters())
    experts = [n for n in plan.names if params.get(n, params.get(f"{n}.weight")).dim() == 3]
    assert len(experts) == 2 * LAYERS, plan.names  # gate_up and down per layer
    for name in experts:  # every expert has its own thresholds
        for method in methods:
            t = plans[method].channel_thresholds[name]
            assert t.shape[0] == 4 and all(not torch.equal(t[0], t[e]) for e in range(1, 4)), (method, name)
        if "teal" in plans:  # TEAL's thresholds are one per expert: four per-expert quantiles
            assert plans["teal"].channel_thresholds[name][:, 0].unique().numel() == 4
    with caplog.at_level("WARNING", logger="wisparse_compile.experts"):
        wsc.attach(model, plan)
    assert model.config._experts_implementation == "grouped_mm"
    assert any("'eager' experts implementation" in r.getMessage() for r in caplog.records)
    forms = {}
    for implementation, dtype in EXPERT_VARIANTS:
        torch._dynamo.reset()
        model.set_experts_implementation(implementation)
        wsc.attach(model.to(dtype), plan)  # again: .to(dtype) would cast the thresholds too
        report, dense_left = _compile_and_check(
            arch, model, plan, tol=1e-4 if dtype == torch.float32 else 2e-2
        )
        assert [reason for _, reason in dense_left] == ["no plan entry"]  # only the output head
        forms[(implementation, dtype)] = sorted({d.form for d in report.decisions if d.name in experts})
    assert forms == {
        ("grouped_mm", torch.float32): ["grouped_mm"],
        ("batched_mm", torch.float32): ["bmm"],
        ("grouped_mm", torch.bfloat16): ["grouped_mm (native)"],
    }


def _layer_classes(model: torch.nn.Module) -> set[str]:
    return {type(layer).__name__ for layer in model.model.layers}


@pytest.mark.slow
@pytest.mark.parametrize("arch", HYBRID_ARCHS, ids=lambda a: a.name)
def test_hybrid_decoder_layers_are_planned_without_configuration(arch: Arch, lowering: str):
    """A layer list that mixes block classes (attention and state-space layers) is the decoder's:
    calibration plans every linear inside it with no ``include`` pattern (the same set a user's
    regex over ``model.layers`` gives), the allocation splits per layer whatever its class, and the
    compiled model matches the eager masked reference."""
    model = arch.build()
    assert len(_layer_classes(model)) == 2, _layer_classes(model)
    batches = token_batches(2, batch=2, length=16)
    # the sensitivity-weighted greedy split and the trade across mixed layers (one re-run per layer, with its
    # own signature); a coarse step: a mamba layer re-runs slowly
    plan = wsc.calibrate(model, batches, wsc.SparsityConfig(sparsity=0.5, method="wisparse", refinement_step=0.25))
    by_regex = wsc.calibrate(model, batches, wsc.SparsityConfig(sparsity=0.5, include=r"^model\.layers\.", allocation=wsc.Uniform()))
    assert sorted(plan.names) == sorted(by_regex.names)
    for layer in ("model.layers.0.", "model.layers.1."):  # one layer of each class
        assert any(n.startswith(layer) for n in plan.names), (layer, plan.names)
        assert layer in plan.stats["allocation"]["block_sparsities"]
    wsc.attach(model, plan)
    _compile_and_check(arch, model, plan)


@pytest.mark.slow
def test_moe_class_that_rejects_an_experts_switch_attaches(caplog):
    """JetMoe's class does not support ``set_experts_implementation``: attach works, keeps its experts
    code and says why; the compiled model sparsifies the linears it sees as linears and leaves the
    experts it cannot (named in the report, with the reason) dense, equal to the masked reference
    with those experts unplanned."""
    import dataclasses

    from torch._dynamo.backends.debugging import aot_eager
    import torch._inductor.compile_fx as compile_fx_module

    model = JETMOE.build()
    assert model.config._experts_implementation == "eager"
    plan = wsc.calibrate(model, token_batches(1, batch=2, length=16), wsc.SparsityConfig(sparsity=0.5, allocation=wsc.Uniform()))
    params = dict(model.named_parameters())
    stacked = [n for n in plan.names if params.get(n, params.get(f"{n}.weight")).dim() == 3]
    assert len(stacked) == 4, plan.names  # attention experts (in, out) and MLP experts (in, out)
    with caplog.at_level("WARNING", logger="wisparse_compile.experts"):
        wsc.attach(model, plan)
    assert model.config._experts_implementation == "eager"
    assert any("keeps its own experts code" in r.getMessage() and "does not support" in r.getMessage()
               for r in caplog.records)
    first = len(COMPILED_REPORTS)
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(compile_fx_module, "compile_fx", lambda gm, inputs, config_patches=None: aot_eager(gm, inputs))
        out = torch.compile(model, backend="wisparse")(IDS).logits
        dense = model(IDS).logits
        others = [n for n in plan.names if n not in stacked]
        unplanned_experts = dataclasses.replace(
            plan, **{f: {n: getattr(plan, f)[n] for n in others}
                     for f in ("channel_thresholds", "sparsities", "shapes", "in_dims")})
        wsc.attach(model, unplanned_experts)
        with masked_linears():
            ref = model(IDS).logits
    decisions = [d for r in COMPILED_REPORTS[first:] for d in r.decisions]
    sparse = {d.name for d in decisions if d.decision == "sparse"}
    assert sparse and sparse <= set(others)
    assert any(d.decision == "dense" and d.reason and d.reason != "no plan entry" for d in decisions)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert (out - dense).abs().max() > 0
