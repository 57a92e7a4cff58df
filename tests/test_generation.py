"""generate() with a static cache and a compiled decode step (CompileConfig(backend="wisparse")).

transformers compiles only the decode step; prefill runs eager (dense, since masking is the
compiled graph's job). The reference is therefore eager generation with decode-step linears
masked (``masked_linears(max_rows=batch)``): greedy tokens must match one for one.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import wisparse_compile as wsc
from tests.archs import BY_NAME
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
