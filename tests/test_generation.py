"""generate() with a static cache and a compiled decode step (CompileConfig(backend="wisparse")).

transformers compiles only the decode step; prefill runs eager (dense, since masking is the
compiled graph's job). The reference is therefore eager generation with decode-step linears
masked (``masked_linears(max_rows=batch)``): greedy tokens must match one for one. Encoder-decoders
and vision-language models too (the reference then masks every call after the prefill).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import wisparse_compile as wsc
from tests.archs import BY_NAME, CROSS_ATTENTION_KV, text_batches
from tests.conftest import token_batches
from wisparse_compile.backend import COMPILED_REPORTS
from wisparse_compile.reference import masked_linears

# two prompts, the second left-padded (pad id 0)
IDS = torch.tensor([[5, 17, 33, 2, 9], [0, 0, 44, 12, 8]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
NEW = dict(
    max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static",
    return_dict_in_generate=True, output_logits=True,
)


def _compile_config():
    from transformers import CompileConfig

    config = CompileConfig(backend="wisparse", fullgraph=False)  # default mode: "reduce-overhead"
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    return config


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_generate_matches_masked_reference(name: str):
    model = BY_NAME[name].build()
    plan = wsc.calibrate(model, token_batches(1, batch=2, length=16), wsc.SparsityConfig(sparsity=0.5))
    wsc.attach(model, plan)
    counters.clear()
    first = len(COMPILED_REPORTS)
    out = model.generate(input_ids=IDS, attention_mask=MASK, compile_config=_compile_config(), **NEW)
    with masked_linears(max_rows=IDS.shape[0]):
        ref = model.generate(input_ids=IDS, attention_mask=MASK, disable_compile=True, **NEW)
    dense = model.generate(input_ids=IDS, attention_mask=MASK, disable_compile=True, **NEW)
    assert torch.equal(out.sequences, ref.sequences), (out.sequences, ref.sequences)
    for step, (got, want, plain) in enumerate(zip(out.logits, ref.logits, dense.logits)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        if step > 0:  # decode steps (the first token comes from the eager, dense prefill)
            assert (got - plain).abs().max() > 1e-3, "sparsity did not change the decode logits"

    # decode steps went through the sparse op: every planned linear rewritten in the decode graph
    reports = COMPILED_REPORTS[first:]
    assert reports, "the decode step was not compiled"
    for report in reports:
        assert sorted(d.name for d in report.decisions if d.decision == "sparse") == sorted(plan.names)
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 2, graphs
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])

    print(f"\n{name}: {graphs} decode graph(s), {reports[0].summary()}")
    if name != "llama":
        return
    # another prompt length: the static cache is re-sized, which may recompile once; still bounded
    longer = torch.cat([IDS, IDS[:, -2:]], dim=1)
    longer_mask = torch.cat([MASK, MASK[:, -2:]], dim=1)
    out2 = model.generate(input_ids=longer, attention_mask=longer_mask, compile_config=_compile_config(), **NEW)
    with masked_linears(max_rows=IDS.shape[0]):
        ref2 = model.generate(input_ids=longer, attention_mask=longer_mask, disable_compile=True, **NEW)
    assert torch.equal(out2.sequences, ref2.sequences)
    total = counters["stats"]["unique_graphs"]
    assert total <= graphs + 1 < torch._dynamo.config.recompile_limit, total
    print(f"{name}: {total} decode graph(s) after a second prompt length")


class _MaskedAfterPrefill:
    """``masked_linears()`` on every model call after the first: generate runs its prefill eager
    (dense) and compiles only the later calls, and for an encoder-decoder the first decoder call
    (one start token per row) is as short as a decode step, so ``max_rows`` cannot tell them apart."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.calls, self.mode, self.handles = model, 0, None, []

    def _before(self, module, args, kwargs) -> None:
        self.calls += 1
        if self.calls > 1:
            self.mode = masked_linears()
            self.mode.__enter__()

    def _after(self, module, args, kwargs, output) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None

    def __enter__(self) -> "_MaskedAfterPrefill":
        self.handles = [self.model.register_forward_pre_hook(self._before, with_kwargs=True),
                        self.model.register_forward_hook(self._after, with_kwargs=True)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("name", ["bart", "llava"])
def test_generate_encoder_decoder_and_vision_language_model(name: str):
    """An encoder-decoder whose encoder is the deeper stack, and a VLM on text: generate compiles the
    decode step with the backend, every decode linear of the plan (made with no configuration: the
    decoder's, the language model's) is sparse, and the tokens equal the masked reference's.

    ``min_new_tokens`` keeps the decode steps coming: a tiny random model may emit EOS at once (a
    tied embedding makes it repeat its input, and Bart starts decoding from its EOS id), which ends
    generate after its eager prefill, before any decode step is compiled: no compile report at all."""
    from torch._dynamo.backends.debugging import aot_eager
    import torch._inductor.compile_fx as compile_fx_module

    model = BY_NAME[name].build()
    plan = wsc.calibrate(model, text_batches(model), wsc.SparsityConfig(sparsity=0.5, allocation=wsc.Uniform()))
    wsc.attach(model, plan)
    new = dict(NEW, min_new_tokens=NEW["max_new_tokens"])
    counters.clear()
    first = len(COMPILED_REPORTS)
    with pytest.MonkeyPatch.context() as mp:  # AOT eager lowering: no C++ compile of the graph
        mp.setattr(compile_fx_module, "compile_fx", lambda gm, inputs, config_patches=None: aot_eager(gm, inputs))
        out = model.generate(input_ids=IDS, attention_mask=MASK, compile_config=_compile_config(), **new)
    with _MaskedAfterPrefill(model):
        ref = model.generate(input_ids=IDS, attention_mask=MASK, disable_compile=True, **new)
    dense = model.generate(input_ids=IDS, attention_mask=MASK, disable_compile=True, **new)
    reports = COMPILED_REPORTS[first:]
    assert reports, "the decode step was not compiled"
    assert torch.equal(out.sequences, ref.sequences), (out.sequences, ref.sequences)
    for step, (got, want, plain) in enumerate(zip(out.logits, ref.logits, dense.logits)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        if step > 0:
            assert (got - plain).abs().max() > 1e-3, "sparsity did not change the decode logits"
    for report in reports:
        dense_left = [d.reason for d in report.decisions if d.decision == "dense"]
        assert dense_left == ["no plan entry"], report.summary()  # the head
        sparse = {d.name for d in report.decisions if d.decision != "dense"}
        # all but an encoder-decoder's cross-attention keys/values (computed once, from the encoder)
        assert sparse <= set(plan.names), report.summary()
        assert all(n.endswith(CROSS_ATTENTION_KV) for n in set(plan.names) - sparse), set(plan.names) - sparse
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    print(f"\n{name}: {reports[0].summary()}")
