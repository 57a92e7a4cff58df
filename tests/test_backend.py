"""End to end on a tiny random Llama: calibrate, attach, torch.compile(backend="wisparse")."""

import importlib.metadata
import logging
import sys

import pytest
import torch

import wisparse_compile as wsc
from tests.conftest import tiny_llama, token_batches
from tests.helpers import MaskingHooks, logits
from torch._dynamo.utils import counters
from wisparse_compile.backend import COMPILED_REPORTS


def _calibrated(seed=0, sparsity=0.5, method="wina"):
    model = tiny_llama(seed)
    plan = wsc.calibrate(model, token_batches(4, seed=seed + 10), wsc.SparsityConfig(sparsity=sparsity, method=method))
    wsc.attach(model, plan)
    return model, plan


def test_backend_is_an_entry_point():
    names = [ep.name for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")]
    assert "wisparse" in names
    assert "wisparse" in torch._dynamo.list_backends(exclude_tags=())


@pytest.mark.parametrize("method", ["teal", "wina"])
def test_compiled_equals_masked_reference(method):
    model, plan = _calibrated(method=method)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(model, backend="wisparse")
    out = logits(compiled, ids)
    report = COMPILED_REPORTS[-1]
    assert report.rewritten == 14, report.summary()
    dense_left = [d for d in report.decisions if d.decision == "dense"]
    assert [d.reason for d in dense_left] == ["no plan entry"]  # lm_head
    with MaskingHooks(model, plan.channel_thresholds):
        ref = logits(model, ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    dense = logits(model, ids)
    assert (out - dense).abs().max() > 1e-2  # sparsity really changed the output

    # the decode shape (one token) takes its own static graph, also sparse
    one = ids[:, :1]
    out1 = logits(compiled, one)
    with MaskingHooks(model, plan.channel_thresholds):
        torch.testing.assert_close(out1, logits(model, one), rtol=1e-4, atol=1e-4)


def test_achieved_sparsity_on_held_out_tokens():
    model, plan = _calibrated()
    held_out = token_batches(4, seed=99)
    from wisparse_compile.eval import overall_sparsity
    from wisparse_compile.reference import measure_sparsity

    # every linear masked at once, as compiled (thresholds are calibrated on the masked model):
    # each linear hits its allocated sparsity and the parameter-weighted budget holds
    achieved = measure_sparsity(model, held_out)
    for name, value in achieved.items():
        assert value == pytest.approx(plan.sparsities[name], abs=0.03), name
    assert overall_sparsity(achieved, plan.shapes) == pytest.approx(0.5, abs=0.02)


def test_sparsity_zero_equals_dense():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 9))
    dense = logits(model, ids)
    plan = wsc.calibrate(model, token_batches(2), wsc.SparsityConfig(sparsity=0.0))
    wsc.attach(model, plan)
    out = logits(torch.compile(model, backend="wisparse"), ids)
    assert COMPILED_REPORTS[-1].rewritten == 14
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_two_instances_with_different_plans_in_one_process():
    a, plan_a = _calibrated(seed=0, sparsity=0.5)
    b, plan_b = _calibrated(seed=1, sparsity=0.3, method="teal")
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(3))
    out_a = logits(torch.compile(a, backend="wisparse"), ids)
    out_b = logits(torch.compile(b, backend="wisparse"), ids)
    with MaskingHooks(a, plan_a.channel_thresholds):
        torch.testing.assert_close(out_a, logits(a, ids), rtol=1e-4, atol=1e-4)
    with MaskingHooks(b, plan_b.channel_thresholds):
        torch.testing.assert_close(out_b, logits(b, ids), rtol=1e-4, atol=1e-4)
    # and again in the other order: graphs are shared, thresholds are not
    out_a2 = logits(torch.compile(a, backend="wisparse"), ids)
    torch.testing.assert_close(out_a2, out_a, rtol=0, atol=0)


def test_no_plan_compiles_like_inductor():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 8))
    out = logits(torch.compile(model, backend="wisparse"), ids)
    report = COMPILED_REPORTS[-1]
    assert report.rewritten == 0 and report.threshold_sources == []
    torch._dynamo.reset()
    ref = logits(torch.compile(model, backend="inductor"), ids)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_plan_attached_after_compiling():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 8))
    compiled = torch.compile(model, backend="wisparse")
    logits(compiled, ids)
    plan = wsc.calibrate(model, token_batches(1), wsc.SparsityConfig())
    # attach re-lays the weights input-major: Dynamo's stride guards recompile, now sparse
    wsc.attach(model, plan)
    out = logits(compiled, ids)
    assert COMPILED_REPORTS[-1].rewritten == 14
    with MaskingHooks(model, plan.channel_thresholds):
        torch.testing.assert_close(out, logits(model, ids), rtol=1e-4, atol=1e-4)
    # without the re-layout nothing triggers a recompile: the stale dense graph says so
    wsc.detach(model)
    torch._dynamo.reset()
    logits(compiled, ids)
    wsc.attach(model, plan, input_major=False)
    with pytest.warns(UserWarning, match="compiled before a plan was attached"):
        logits(compiled, ids)


def test_weights_without_plan_run_dense_through_a_sparse_graph():
    a = tiny_llama(seed=0)
    # same strides as the plain model, so Dynamo reuses the sparse graph for it
    wsc.attach(a, wsc.calibrate(a, token_batches(1), wsc.SparsityConfig()), input_major=False)
    plain = tiny_llama(seed=2)
    ids = torch.randint(0, 256, (1, 8))
    logits(torch.compile(a, backend="wisparse"), ids)
    with pytest.warns(UserWarning, match="weights that have none"):
        out = logits(torch.compile(plain, backend="wisparse"), ids)
    torch.testing.assert_close(out, logits(plain, ids), rtol=1e-5, atol=1e-5)


def test_unmasked_prefill_option():
    model, plan = _calibrated()
    compiled = torch.compile(model, backend="wisparse", options={"mask_prefill": False})
    ids = torch.randint(0, 256, (1, 12))
    out = logits(compiled, ids)
    report = COMPILED_REPORTS[-1]
    assert report.rewritten == 0
    assert {d.reason for d in report.decisions if d.name} == {"prefill left dense (mask_prefill=False)"}
    torch.testing.assert_close(out, logits(model, ids), rtol=1e-5, atol=1e-5)
    logits(compiled, ids[:, :1])  # decode shape: sparse
    assert COMPILED_REPORTS[-1].rewritten == 14


def test_mode_and_inductor_options_pass_through():
    model, _ = _calibrated()
    ids = torch.randint(0, 256, (1, 4))
    logits(torch.compile(model, backend="wisparse", mode="reduce-overhead"), ids)
    assert COMPILED_REPORTS[-1].rewritten == 14
    torch._dynamo.reset()
    logits(torch.compile(model, backend="wisparse", options={"max_sparse_rows": 4, "epilogue_fusion": True}), ids)
    assert COMPILED_REPORTS[-1].rewritten == 14
    with pytest.raises(Exception, match="unknown wisparse backend option"):
        torch._dynamo.reset()
        logits(torch.compile(model, backend="wisparse", options={"wisparse.bogus": 1}), ids)


def test_detach_returns_to_dense():
    model, _ = _calibrated()
    wsc.detach(model)
    assert wsc.attached_plan(model) is None
    ids = torch.randint(0, 256, (1, 8))
    out = logits(torch.compile(model, backend="wisparse"), ids)
    assert COMPILED_REPORTS[-1].rewritten == 0
    torch.testing.assert_close(out, logits(model, ids), rtol=1e-5, atol=1e-5)


def test_pass_decisions_are_logged(caplog):
    model, _ = _calibrated()
    with caplog.at_level(logging.DEBUG, logger="wisparse_compile"):
        logits(torch.compile(model, backend="wisparse"), torch.randint(0, 256, (1, 4)))
    text = caplog.text
    assert "15 linears: 14 sparse, 1 dense (1 no plan entry)" in text
    assert "sparse: model.layers.0.mlp.down_proj" in text


def test_swapping_plans_on_a_compiled_model_does_not_recompile():
    """attach() of another plan changes thresholds only: the compiled graph keeps serving (no
    Dynamo recompile, no backend call), and its output follows the plan attached now."""
    model = tiny_llama()
    batches = token_batches(2)
    plans = {s: wsc.calibrate(model, batches, wsc.SparsityConfig(sparsity=s, method="teal")) for s in (0.3, 0.6)}
    ids = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(4))  # a decode step
    wsc.attach(model, plans[0.3])
    compiled = torch.compile(model, backend="wisparse")
    logits(compiled, ids)
    graphs, reports = counters["stats"]["unique_graphs"], len(COMPILED_REPORTS)
    outputs = {}
    for s in (0.6, 0.3, 0.6):
        wsc.attach(model, plans[s])
        outputs.setdefault(s, []).append(logits(compiled, ids))
        with MaskingHooks(model, plans[s].channel_thresholds):
            torch.testing.assert_close(outputs[s][-1], logits(model, ids), rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs, "a plan swap recompiled"
    assert len(COMPILED_REPORTS) == reports, "a plan swap called the backend again"
    assert (outputs[0.6][0] - outputs[0.3][0]).abs().max() > 1e-3  # the swap took effect
    torch.testing.assert_close(outputs[0.6][0], outputs[0.6][1], rtol=0, atol=0)


def test_attach_warns_once_when_eager_reduced_precision_matmuls_get_slow(monkeypatch, caplog):
    """Re-laying bf16 CPU weights input-major makes eager matmuls slow where the CPU has no native
    bf16 GEMM (AVX2): attach says so, once per process (forced here, whatever this CPU is)."""
    attach_module = sys.modules["wisparse_compile.attach"]
    monkeypatch.setattr(attach_module, "_warned_slow_eager_layout", False)
    monkeypatch.setattr(attach_module, "input_major_gemm_is_slow", lambda w: w.dtype == torch.bfloat16)
    fp32 = tiny_llama()
    plan = wsc.calibrate(fp32, token_batches(1), wsc.SparsityConfig(sparsity=0.5, method="teal"))
    with caplog.at_level(logging.WARNING, logger=attach_module.__name__):
        wsc.attach(fp32, plan)
        assert "EAGER matmuls" not in caplog.text
        for _ in range(2):
            wsc.attach(tiny_llama().to(torch.bfloat16), plan)
    assert caplog.text.count("EAGER matmuls") == 1, caplog.text
