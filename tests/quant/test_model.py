"""int8 and int4 weights of a model (the model API, ``quant/model.py``): ``attach(..., weights="int8"|"int4")``
through the compiler (sparse planned linears and the dense quantized head), tied heads, detach, switching
formats, bad input, and torchao's int8 weight-only tensors. (The quantizers and the weight tensors in
eager code: test_primitives.py, test_tensors.py; the int8 accuracy benchmark: tests/test_int8_accuracy_bench.py.)"""

import copy
import logging
from typing import Callable, NamedTuple

import pytest
import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

import wisparse_compile as wsc
from tests.conftest import tiny_llama, token_batches
from tests.helpers import MaskingHooks
from wisparse_compile.attach import unplanned
from wisparse_compile.config import QuantizeConfig
from wisparse_compile.kernels import Layout, Route
from wisparse_compile.passes.decisions import Outcome
from wisparse_compile.quant.model import quantization_of
from wisparse_compile.quant.primitives import quantize_int4, quantize_int8
from wisparse_compile.quant.tensors import Int4Weight, Int8Weight, from_torchao


_CALIBRATED: dict = {}


def _planned(tied=False):
    """A fresh tiny Llama and its 50% plan (calibrated once per module; the tie comes after it)."""
    if not _CALIBRATED:
        model = tiny_llama(0)
        _CALIBRATED["model"] = copy.deepcopy(model)
        _CALIBRATED["plan"] = wsc.calibrate(model, token_batches(2), wsc.SparsityConfig(sparsity=0.5, method="teal", allocation=wsc.Uniform()))
    model = copy.deepcopy(_CALIBRATED["model"])
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model, _CALIBRATED["plan"]


def assert_compiled_matches_masked_reference(model, plan, ids) -> None:
    """The compiled model's logits are the eager model's (dequantized weights) with the plan's masks."""
    with torch.no_grad():
        out = torch.compile(model, backend="wisparse")(ids).logits
        with MaskingHooks(model, plan.channel_thresholds):
            ref = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# ---- int8 and int4: one test per concern, over both formats ----

class Format(NamedTuple):
    """What the shared tests need of one weight format; where int8 and int4 differ for a reason, it is here."""

    weight_type: type
    quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    layout: Layout
    head_error: float  # the dequantized head's largest error, in max|W|
    error_bounds: tuple[float, float]  # eager logits' relative error against the float model


FORMATS = {
    "int8": Format(Int8Weight, quantize_int8, Layout.INT8,
                   head_error=1 / 127, error_bounds=(0, 0.02)),  # one step of max|W| / 127
    "int4": Format(Int4Weight, quantize_int4, Layout.INT4,  # two steps of at most
                   head_error=2 / 6, error_bounds=(0.01, 0.2)),  # max|W| / 6; coarser than int8, still close
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_error_is_bounded_switching_formats_goes_through_float_and_detach_restores_exactly(fmt):
    """Attach from another format, then the same one again: the codes come from the float originals;
    detach gives the float model back exactly (row-major), and it attaches again to the same weights."""
    spec = FORMATS[fmt]
    other = next(o for o in FORMATS if o != fmt)
    model, plan = _planned()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        dense = model(ids).logits
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        wsc.attach(model, plan, weights=QuantizeConfig(weights=other, head=True))
        wsc.attach(model, plan, weights=fmt)  # other -> fmt: from the float originals, not the other codes
        assert wsc.attach(model, plan, weights=fmt) is model  # the same format twice
        w = model.model.layers[1].self_attn.o_proj.weight
        assert isinstance(w, spec.weight_type)
        assert torch.equal(w.qdata, spec.quantize(params["model.layers.1.self_attn.o_proj.weight"])[0])
        with unplanned(list(model.parameters())):
            quantized = model(ids).logits  # eager, dense, quantized weights
        wsc.detach(model)
        assert not any(isinstance(p, (Int4Weight, Int8Weight)) for p in model.parameters())
        assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
        assert all(p.is_contiguous() for p in model.parameters())  # laid back row-major
        assert quantization_of(model) is None
        torch.testing.assert_close(model(ids).logits, dense, rtol=0, atol=0)
        wsc.attach(model, plan, weights=fmt)
        with unplanned(list(model.parameters())):
            torch.testing.assert_close(model(ids).logits, quantized, rtol=0, atol=0)
    low, high = spec.error_bounds
    rel = (quantized - dense).norm() / dense.norm()
    assert low < rel < high, rel


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_attach_compiles_every_linear_to_the_quantized_op_and_matches_the_eager_reference(fmt, caplog):
    """Decode (2 rows): the 14 planned linears (siblings grouped) and the dense head all run the format's C++ kernels,
    and the logits match the eager model on the dequantized weights with the plan's masks."""
    spec = FORMATS[fmt]
    model, plan = _planned()
    ids = torch.randint(0, 256, (2, 1), generator=torch.Generator().manual_seed(3))
    with caplog.at_level(logging.INFO, logger="wisparse_compile.quant.model"):
        wsc.attach(model, plan, weights=fmt)
    assert f"{fmt} weights for 15 linears (with the head)" in caplog.text
    summary = quantization_of(model)
    assert summary.format == fmt and summary.head == "lm_head" and len(summary.quantized) == 15
    assert not summary.skipped
    assert isinstance(model.lm_head.weight, spec.weight_type)
    assert isinstance(model.model.layers[0].mlp.up_proj.weight, spec.weight_type)
    with torch.no_grad():
        out, code = run_and_get_code(lambda: torch.compile(model, backend="wisparse")(ids).logits)
        with MaskingHooks(model, plan.channel_thresholds):  # eager: F.linear on the dequantized weights
            ref = model(ids).logits
    code = "\n".join(code)
    # per layer: q/k/v in one group call, gate/up in another (passes/group_quantized.py), o and down alone
    assert code.count(f"torch.ops.wisparse_cpu.sparse_gemv_{fmt}_group.default(") == 4
    assert code.count(f"torch.ops.wisparse_cpu.sparse_gemv_{fmt}.default(") == 5  # o, down x 2 layers + the dense head
    assert not any(f"sparse_gemv_{other}" in code for other in FORMATS if other != fmt)
    assert "torch.ops.wisparse_cpu.sparse_gemv.default(" not in code
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    report = wsc.last_compile_report()
    assert [(d.layout, d.route) for d in report.decisions].count((spec.layout, Route.CPU_KERNEL)) == 15
    assert [d.decision for d in report.decisions].count(Outcome.FUSED) == 10  # q, k, v, gate, up x 2 layers
    head = [d for d in report.decisions if d.name is None]
    assert len(head) == 1 and head[0].decision == Outcome.DENSE and fmt in head[0].reason


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_prefill_runs_the_masked_dense_quantized_route(fmt):
    spec = FORMATS[fmt]
    model, plan = _planned()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    wsc.attach(model, plan, weights=fmt)
    assert_compiled_matches_masked_reference(model, plan, ids)
    assert {(d.layout, d.route) for d in wsc.last_compile_report().decisions} == {(spec.layout, Route.MASKED_DENSE)}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_tied_head_gets_its_own_quantized_copy_and_detach_ties_it_again(fmt):
    spec = FORMATS[fmt]
    model, plan = _planned(tied=True)
    emb = model.model.embed_tokens.weight
    ids = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(6))
    wsc.attach(model, plan, weights=fmt)
    assert quantization_of(model).untied is True
    assert model.model.embed_tokens.weight is emb and type(emb) is nn.Parameter  # the embedding stays float
    assert isinstance(model.lm_head.weight, spec.weight_type)
    torch.testing.assert_close(model.lm_head.weight.dequantize(), emb.detach(), atol=emb.abs().max().item() * spec.head_error, rtol=0)
    assert_compiled_matches_masked_reference(model, plan, ids)
    wsc.detach(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight is emb


# ---- attach options, bad formats, torchao's tensors ----

def test_keep_float_false_frees_the_originals_and_detach_restores_dequantized_values(caplog):
    model, plan = _planned()
    wsc.attach(model, plan, weights=QuantizeConfig(keep_float=False, head=False))
    assert quantization_of(model).head is None and type(model.lm_head.weight) is nn.Parameter
    q = model.model.layers[0].mlp.down_proj.weight.dequantize()
    with caplog.at_level(logging.WARNING, logger="wisparse_compile.quant.model"):
        wsc.detach(model)
    assert "restored their int8 values" in caplog.text
    w = model.model.layers[0].mlp.down_proj.weight
    assert type(w) is nn.Parameter and torch.equal(w, q)


def test_bad_weight_format_is_refused_before_the_model_changes():
    model, plan = _planned()
    before = {n: p for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="QuantizeConfig.weights must be one of \\('int8', 'int4'\\), got 'int3'"):
        wsc.attach(model, plan, weights="int3")
    with pytest.raises(ValueError, match="group_size must be 32"):
        wsc.attach(model, plan, weights=QuantizeConfig(weights="int4", group_size=64))
    assert all(p is before[n] for n, p in model.named_parameters())


def test_torchao_int8_weight_only_tensors_are_taken_without_requantizing():
    """Optional: torchao is no dependency of this package (run with it on PYTHONPATH to check)."""
    tq = pytest.importorskip("torchao.quantization")
    model, plan = _planned()
    tq.quantize_(model, tq.Int8WeightOnlyConfig())
    ao = model.model.layers[0].self_attn.q_proj.weight
    codes = ao.qdata.clone()
    wsc.attach(model, plan, weights="int8")
    w = model.model.layers[0].self_attn.q_proj.weight
    assert isinstance(w, Int8Weight) and torch.equal(w.qdata, codes.t())
    assert from_torchao(torch.randn(2, 2)) is None
    ids = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(7))
    assert_compiled_matches_masked_reference(model, plan, ids)


def test_quantize_model_refuses_to_requantize_another_format():
    from wisparse_compile.quant.model import quantize_model

    model, plan = _planned()
    quantize_model(model, plan.names, QuantizeConfig(weights="int8"))
    with pytest.raises(ValueError, match="already int8-quantized; detach\\(model\\) first"):
        quantize_model(model, plan.names, QuantizeConfig(weights="int4"))


class _Mixed(nn.Module):
    """One weight of each kind quantize_model meets: a linear, stacked experts, an [in, out] weight, integers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(32, 16)
        self.experts = nn.Parameter(torch.randn(2, 16, 32))
        self.conv1d = nn.Parameter(torch.randn(32, 16))  # [in, out]
        self.codes = nn.Parameter(torch.ones(16, 32, dtype=torch.int8), requires_grad=False)


def test_quantize_model_skips_what_it_cannot_quantize_and_says_why():
    from wisparse_compile.quant.model import dequantize_model, quantize_model

    model = _Mixed()
    original = model.proj.weight
    assert quantization_of(model) is None and dequantize_model(model) == []
    with pytest.raises(ValueError, match="'nowhere' names no weight of this _Mixed"):
        quantize_model(model, ["nowhere"], QuantizeConfig())
    summary = quantize_model(model, ["proj", "proj", "experts", "conv1d", "codes"], QuantizeConfig(), in_dims={"conv1d": 0})
    assert summary == quantization_of(model)
    assert (summary.quantized, summary.head, summary.untied, summary.format) == (["proj"], None, False, "int8")
    assert summary.skipped == {
        "experts": "3-D weight (stacked experts stay in their float dtype)",
        "conv1d": "[in, out] weight (1-D-convolution style): int8 takes [out, in] linears",
        "codes": "weight dtype torch.int8 is not floating point",
    }
    assert isinstance(model.proj.weight, Int8Weight) and not model.proj.weight.requires_grad
    assert type(model.experts) is nn.Parameter and type(model.conv1d) is nn.Parameter
    assert dequantize_model(model) == ["proj"] and model.proj.weight is original
    assert quantization_of(model) is None and dequantize_model(model) == []
