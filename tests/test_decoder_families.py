"""Vision-language models and encoder-decoders, with no configuration: calibration plans the layers
that decode (the language model, the decoder), the compiled decode steps on the model's own cache
equal the eager masked reference, and every linear of a decode step is sparse except the head.

The models are tiny random configs of transformers' own classes (tests/archs.py). As in
test_architectures, the rewritten graphs are lowered with AOT autograd's eager lowering (Inductor's
C++ code generation costs about a minute per model here); the pass and the sparse ops are the same.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
from torch._dynamo.utils import counters

import wisparse_compile as wsc
from tests.archs import BY_NAME, CROSS_ATTENTION_KV, IMAGE_TOKEN, Arch, text_batches
from wisparse_compile.backend import COMPILED_REPORTS
from wisparse_compile.model_io import cache_keyword
from wisparse_compile.model_structure import decoding_layers
from wisparse_compile.reference import masked_linears

FAMILIES = [BY_NAME[name] for name in ("idefics3", "llava", "bart", "t5")]
STEPS = 3
SPARSE = ("sparse", "fused")  # rewritten to a sparse op, alone or fused with its siblings


def calibrated(arch: Arch) -> tuple[torch.nn.Module, wsc.SparsityPlan]:
    """The model with a default-chosen plan attached (uniform split: the allocation has its own tests)."""
    model = arch.build()
    plan = wsc.calibrate(model, text_batches(model), wsc.SparsityConfig(sparsity=0.5, allocation=wsc.Uniform()))
    decoding = decoding_layers(model)
    assert decoding is not None and all(n.startswith(decoding.name + ".") for n in plan.names), plan.names
    wsc.attach(model, plan)
    return model, plan


def model_cache(outputs: Any) -> Any:
    """The KV cache a forward returned (``cache`` since transformers renamed it, ``past_key_values`` before)."""
    return next(outputs[k] for k in ("cache", "past_key_values") if outputs.get(k) is not None)


@pytest.fixture
def aot_eager_lowering(monkeypatch):
    from torch._dynamo.backends.debugging import aot_eager
    import torch._inductor.compile_fx as compile_fx_module

    monkeypatch.setattr(compile_fx_module, "compile_fx", lambda gm, inputs, config_patches=None: aot_eager(gm, inputs))


def decode_and_compare(
    model: torch.nn.Module, outputs: Any, step_inputs: Callable[[torch.Tensor], dict[str, Any]], steps: int = STEPS,
) -> list[Any]:
    """From a prefill's ``outputs``, run ``steps`` greedy decode steps compiled with the backend on the
    model's own cache and, on a copy of that cache, eager under ``masked_linears()``: logits equal
    step by step, and different from the dense model's. Returns the decode graphs' reports."""
    cache, reference_cache = model_cache(outputs), copy.deepcopy(model_cache(outputs))
    dense_cache = copy.deepcopy(cache)
    keyword = cache_keyword(model)
    step = torch.compile(model, backend="wisparse", fullgraph=True)
    token = outputs.logits[:, -1:].argmax(-1)
    first = len(COMPILED_REPORTS)
    counters.clear()
    for _ in range(steps):
        inputs = step_inputs(token)
        got = step(**inputs, **{keyword: cache}, use_cache=True).logits
        with masked_linears():
            want = model(**inputs, **{keyword: reference_cache}, use_cache=True).logits
        dense = model(**inputs, **{keyword: dense_cache}, use_cache=True).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert (got - dense).abs().max() > 1e-4, "sparsity did not change the decode logits"
        token = want[:, -1:].argmax(-1)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    return COMPILED_REPORTS[first:]


def assert_all_sparse_but_the_head(report, plan: wsc.SparsityPlan, extra_dense: int = 0) -> None:
    """Every linear of the graph is sparse except the unplanned head (and ``extra_dense`` more
    unplanned ones, e.g. a vision tower's in a prefill)."""
    dense = [(d.name or d.form, d.reason) for d in report.decisions if d.decision == "dense"]
    assert len(dense) == 1 + extra_dense and all(reason == "no plan entry" for _, reason in dense), dense
    sparse = {d.name for d in report.decisions if d.decision in SPARSE}
    assert sparse and sparse <= set(plan.names), report.summary()


@pytest.mark.parametrize("arch", FAMILIES, ids=lambda a: a.name)
def test_decode_steps_on_the_models_own_cache(arch: Arch, aot_eager_lowering):
    """Prefill eager (text only), then compiled decode steps: equal to the masked reference, every
    decode linear sparse except the head. An encoder-decoder's cross-attention keys and values come
    from the encoder once (cached), so its decode graph has every planned linear but those."""
    model, plan = calibrated(arch)
    prompt = torch.randint(0, IMAGE_TOKEN, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            encoded = model.get_encoder()(input_ids=prompt)
            start = torch.tensor([[model.config.decoder_start_token_id]])
            outputs = model(encoder_outputs=encoded, decoder_input_ids=start, use_cache=True)
            reports = decode_and_compare(model, outputs, lambda t: dict(encoder_outputs=encoded, decoder_input_ids=t))
        else:
            outputs = model(input_ids=prompt, use_cache=True)
            reports = decode_and_compare(model, outputs, lambda t: dict(input_ids=t))
    assert reports, "no decode step was compiled"
    for report in reports:
        assert_all_sparse_but_the_head(report, plan)
        sparse = {d.name for d in report.decisions if d.decision in SPARSE}
        # what a decode step does not run: the cross-attention projections of the (cached) encoder output
        assert all(n.endswith(CROSS_ATTENTION_KV) for n in set(plan.names) - sparse), set(plan.names) - sparse
        if not model.config.is_encoder_decoder:
            assert sparse == set(plan.names)


@pytest.mark.slow
def test_image_prefill_then_decode(aot_eager_lowering):
    """An image through a VLM: the compiled prefill takes pixel values (the vision tower dense,
    unplanned; the language model sparse), then compiled decode steps; all equal the masked reference."""
    arch = BY_NAME["llava"]
    model, plan = calibrated(arch)
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2  # one image token per patch feature
    g = torch.Generator().manual_seed(6)
    prompt = torch.cat([torch.full((1, patches), IMAGE_TOKEN), torch.randint(0, IMAGE_TOKEN, (1, 5), generator=g)], 1)
    pixels = torch.randn(1, 3, vision.image_size, vision.image_size, generator=g)
    first = len(COMPILED_REPORTS)
    with torch.no_grad():
        outputs = torch.compile(model, backend="wisparse")(input_ids=prompt, pixel_values=pixels, use_cache=True)
        with masked_linears():
            reference = model(input_ids=prompt, pixel_values=pixels, use_cache=True)
        text_only = model(input_ids=prompt, use_cache=False)
        torch.testing.assert_close(outputs.logits, reference.logits, rtol=1e-4, atol=1e-4)
        assert (outputs.logits - text_only.logits).abs().max() > 1e-3, "the image did not reach the language model"
        prefill_reports = COMPILED_REPORTS[first:]
        reports = decode_and_compare(model, outputs, lambda t: dict(input_ids=t))
    vision_linears = sum(1 for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and not n.startswith(("model.language_model.", "lm_head")))
    decisions = [d for r in prefill_reports for d in r.decisions]
    assert {d.name for d in decisions if d.decision in SPARSE} == set(plan.names)
    dense = [d for d in decisions if d.decision == "dense"]
    assert len(dense) == vision_linears + 1 and all(d.reason == "no plan entry" for d in dense)
    for report in reports:
        assert_all_sparse_but_the_head(report, plan)
