"""attach / detach against what users do to a model afterwards: cast it, save it, detach it,
run it with autograd on, move it. Each either keeps what is computed or says why it cannot. A plan for
another model (size, shapes, architecture) is refused with the reason."""

from __future__ import annotations

import warnings

import pytest
import torch

import wisparse_compile as wsc
from tests.archs import BY_NAME
from tests.conftest import tiny_llama, token_batches
from tests.helpers import MaskingHooks, logits
from wisparse_compile.attach import unplanned
from wisparse_compile.planned import plan_generation, plan_of, planned_sparsity, thresholds_of
from wisparse_compile.backend import COMPILED_REPORTS
from wisparse_compile.reference import masked_linears

DOWN = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def plan():
    return wsc.calibrate(tiny_llama(), token_batches(1), wsc.SparsityConfig(sparsity=0.5, method="teal"))


def _weight(model, name=DOWN):
    return model.get_submodule(name).weight


def _decode_ids(seed=4):
    return torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_after_attach_keeps_fp32_thresholds(plan, dtype):
    """``model.to(dtype)`` after attach leaves the thresholds fp32 (a threshold above fp16's max
    stays finite) and equal to attaching after the cast, eager masked and compiled."""
    plan = plan.to("cpu")
    plan.channel_thresholds[DOWN] = plan.channel_thresholds[DOWN].clone()
    plan.channel_thresholds[DOWN][:4] = 1e5  # > 65504: inf in fp16
    cast_after = wsc.attach(tiny_llama(), plan).to(dtype)
    cast_before = wsc.attach(tiny_llama().to(dtype), plan)
    for name in plan.names:
        t = thresholds_of(_weight(cast_after, name))
        assert t.dtype == torch.float32 and torch.equal(t, plan.channel_thresholds[name]), name
        assert _weight(cast_after, name).stride() == _weight(cast_before, name).stride()
    assert torch.isfinite(thresholds_of(_weight(cast_after))).all()
    ids = token_batches(1, batch=1, length=6)[0]
    with masked_linears():
        torch.testing.assert_close(logits(cast_after, ids), logits(cast_before, ids), rtol=0, atol=0)
    if dtype == torch.bfloat16:  # compiled (one graph serves both: same class, dtype and strides)
        one = _decode_ids()
        out_after = logits(torch.compile(cast_after, backend="wisparse"), one)
        assert COMPILED_REPORTS[-1].rewritten == 14
        out_before = logits(torch.compile(cast_before, backend="wisparse"), one)
        torch.testing.assert_close(out_after, out_before, rtol=0, atol=0)


def test_state_dict_and_save_pretrained_after_attach(plan, tmp_path):
    """Saving an attached model saves the model's values (the input-major layout is not visible);
    the reloaded model with the plan file computes what the original did."""
    from transformers import LlamaForCausalLM

    model = tiny_llama()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    wsc.attach(model, plan)
    assert not _weight(model).is_contiguous()  # re-laid input-major
    torch.save(model.state_dict(), tmp_path / "state.pt")
    model.save_pretrained(tmp_path / "hf")
    plan.save(tmp_path / "plan.wsp")

    from_state = tiny_llama(seed=5)
    from_state.load_state_dict(torch.load(tmp_path / "state.pt"))
    from_hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    for reloaded in (from_state, from_hf):
        state = reloaded.state_dict()
        assert all(torch.equal(state[k], v) for k, v in dense.items())

    ids = _decode_ids()
    expected = logits(torch.compile(model, backend="wisparse"), ids)
    for reloaded in (from_state, from_hf):
        wsc.attach(reloaded, wsc.SparsityPlan.load(tmp_path / "plan.wsp"))
        torch.testing.assert_close(logits(torch.compile(reloaded, backend="wisparse"), ids), expected, rtol=0, atol=0)


def test_detach_lays_weights_back(plan):
    """detach (or attaching again with input_major=False) restores the row-major layout, so a dense
    compile after detach is the compile of the never-attached model; re-attaching a plan to weights
    already input-major copies nothing."""
    model = tiny_llama()
    strides = {n: p.stride() for n, p in model.named_parameters()}
    wsc.attach(model, plan)
    w = _weight(model)
    assert w.stride() == (1, w.shape[0])
    pointer = w.data_ptr()
    wsc.attach(model, plan)  # a plan swap: no copy of the weights
    assert w.data_ptr() == pointer and w.stride() == (1, w.shape[0])
    wsc.detach(model)
    assert {n: p.stride() for n, p in model.named_parameters()} == strides
    assert all(p.is_contiguous() for p in model.parameters())
    wsc.attach(model, plan)
    wsc.attach(model, plan, input_major=False)
    assert {n: p.stride() for n, p in model.named_parameters()} == strides

    wsc.detach(model)
    ids = torch.randint(0, 256, (1, 8))
    out = logits(torch.compile(model, backend="wisparse"), ids)
    assert COMPILED_REPORTS[-1].rewritten == 0
    torch._dynamo.reset()
    torch.testing.assert_close(out, logits(torch.compile(tiny_llama(), backend="inductor"), ids), rtol=0, atol=0)


def test_forward_with_autograd_runs_dense_with_one_warning(plan):
    """Without torch.no_grad() the compiled graph records autograd; the sparse ops have no backward,
    so the planned linears run dense (one warning says so), and backward gives the dense gradients.
    Under no_grad the same compiled model is sparse (Dynamo guards on grad mode)."""
    model = wsc.attach(tiny_llama(), plan)
    reference = tiny_llama()  # same seed: same weights, never attached
    ids = torch.randint(0, 256, (1, 6))
    compiled = torch.compile(model, backend="wisparse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(ids).logits
    ours = [str(w.message) for w in caught if "wisparse" in str(w.message)]
    assert len(ours) == 1 and "run DENSE" in ours[0] and "torch.no_grad()" in ours[0], ours
    expected = reference(ids).logits
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    expected.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)

    sparse = logits(compiled, ids)  # no_grad: recompiled, sparse
    assert COMPILED_REPORTS[-1].rewritten == 14
    with MaskingHooks(model, plan.channel_thresholds):
        torch.testing.assert_close(sparse, logits(model, ids), rtol=1e-4, atol=1e-4)


def test_thresholds_move_once_then_stay_the_same_tensor(plan):
    """A plan calibrated on one device and attached to a model on another, or a model moved after
    attach, gets its thresholds moved once, on first use, then the same tensor object: no per-call
    copy. (The 'meta' device stands in for CUDA: same code path, no GPU needed.)"""
    with torch.device("meta"):
        on_meta = tiny_llama()
    wsc.attach(on_meta, plan)  # the plan's thresholds are on the CPU
    t = thresholds_of(_weight(on_meta))
    assert t.device.type == "meta" and t.dtype == torch.float32 and thresholds_of(_weight(on_meta)) is t

    model = wsc.attach(tiny_llama(), plan)
    w = _weight(model)
    on_cpu = thresholds_of(w)
    assert thresholds_of(w) is on_cpu
    model.to(torch.bfloat16)  # same device: nothing moves, nothing is cast
    assert thresholds_of(w) is on_cpu and on_cpu.dtype == torch.float32
    # Module.to(another device) keeps the Parameter object and sets its data; the site then moves
    # the thresholds at the next lookup on that device, once
    site = plan_of(w)
    moved = site.thresholds_on(torch.device("meta"))
    assert moved.device.type == "meta" and site.thresholds_on(torch.device("meta")) is moved
    back = thresholds_of(w)  # and back, once
    assert back.device.type == "cpu" and torch.equal(back, on_cpu) and thresholds_of(w) is back


def test_planned_sparsity_and_unplanned(plan):
    model = wsc.attach(tiny_llama(), plan)
    weights = [_weight(model, n) for n in plan.names]
    assert [planned_sparsity(w) for w in weights] == [plan.sparsities[n] for n in plan.names]
    assert planned_sparsity(model.lm_head.weight) is None and planned_sparsity("not a tensor") is None
    generation = plan_generation()
    with unplanned(weights[:2]):
        assert plan_of(weights[0]) is None and plan_of(weights[1]) is None
        assert plan_of(weights[2]) is not None
        assert plan_generation() > generation
    assert all(plan_of(w) is not None for w in weights)
    assert [planned_sparsity(w) for w in weights[:2]] == [plan.sparsities[n] for n in plan.names[:2]]


# -- plans that do not fit the model ------------------------------------------------------------


def test_plan_for_another_model_size(wina_plan):
    bigger = tiny_llama(layers=3)
    other = wsc.calibrate(bigger, token_batches(1), wsc.SparsityConfig())
    with pytest.raises(wsc.PlanError, match="model.layers.2.self_attn.q_proj"):
        wsc.attach(tiny_llama(), other)


def test_plan_with_wrong_shapes(wina_plan):
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    with pytest.raises(wsc.PlanError, match="model.layers.0.mlp.gate_proj.*shape"):
        wsc.attach(wide, wina_plan)


def test_plan_for_another_architecture(wina_plan):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256))
    with pytest.raises(wsc.PlanError, match="calibrated for LlamaForCausalLM.*GPT2LMHeadModel"):
        wsc.attach(gpt2, wina_plan)


def test_plan_from_one_architecture_refuses_another():
    llama, mistral = BY_NAME["llama"].build(), BY_NAME["mistral"].build()  # same parameter names and shapes
    plan = wsc.calibrate(llama, token_batches(1, batch=1, length=8), wsc.SparsityConfig(sparsity=0.5))
    with pytest.raises(wsc.PlanError, match="calibrated for LlamaForCausalLM, this model is MistralForCausalLM"):
        wsc.attach(mistral, plan)
