"""Sibling fusion in mixture-of-experts blocks: what the graphs show, pinned on tiny random models.

In these graphs (transformers 5.x, experts as stacked 3-D parameters) no two expert contractions
read the same input: the gate and up projections of all experts are one stacked weight
(``gate_up_proj [E, 2I, H]``), so each is already one sparse expert op (``sparse_experts``,
its grouped mm or bmm form) reading the routed, expert-sorted rows, and ``down_proj`` reads the activation.
What does read one input is the block's plain linears: a shared expert's gate and up projections,
its output gate and the router. The router reads the flattened hidden states through one more
``reshape(-1, hidden)`` of the already flat tensor, which the pass sees through, so all four fuse.
"""

from __future__ import annotations

import pytest
import torch

import wisparse_compile as wsc
from tests.archs import BY_NAME, LAYERS, MOE_ARCHS
from tests.conftest import token_batches
from wisparse_compile.backend import COMPILED_REPORTS

OPS = torch.ops.wisparse
#: the ``sparse_experts`` forms each experts implementation gives
EXPERT_FORMS = {"grouped_mm": ("grouped_mm", "grouped_mm_native"), "batched_mm": ("bmm_weight_first", "bmm_weight_second")}


def _planned(name: str):
    model = BY_NAME[name].build(experts_implementation="eager")
    plan = wsc.calibrate(model, token_batches(1, batch=2, length=16), wsc.SparsityConfig(sparsity=0.5, method="wina", allocation=wsc.Uniform()))
    wsc.attach(model, plan)
    return model, plan


def _compile(model, implementation, ids, graphs, fuse):
    torch._dynamo.reset()
    model.set_experts_implementation(implementation)
    with torch.no_grad():
        out = torch.compile(model, backend="wisparse", fullgraph=True, options={"fuse_siblings": fuse})(ids).logits
    return out, graphs[-1], COMPILED_REPORTS[-1]


def _nodes(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def _groups(report):
    groups: dict[str, set[str]] = {}
    for d in report.decisions:
        if d.decision == "fused":
            groups.setdefault(d.node, set()).add(d.name.removeprefix("model.layers.0."))
    return sorted(groups.values(), key=len)


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("tokens", [1, 12])  # decode (sparse kernel route), prefill (masked dense)
def test_shared_expert_router_fuse_and_each_expert_stack_is_one_op(lowered_graphs, implementation, tokens):
    model, plan = _planned("qwen2_moe")
    ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(5))
    single, single_gm, _ = _compile(model, implementation, ids, lowered_graphs, fuse=False)
    fused, gm, report = _compile(model, implementation, ids, lowered_graphs, fuse=True)

    assert LAYERS == 1 and report.rewritten == len(plan.names) == 11
    experts = [n for n in _nodes(gm, OPS.sparse_experts.default) if n.args[4] in EXPERT_FORMS[implementation]]
    assert len(experts) == 2  # gate_up and down: one op per stacked weight, not fused
    assert [n.args[4] in EXPERT_FORMS[implementation] for n in _nodes(single_gm, OPS.sparse_experts.default)] == [True, True]
    assert len(_nodes(single_gm, OPS.sparse_linear.default)) == 9
    assert len(_nodes(gm, OPS.sparse_linear_group.default)) == 2
    assert len(_nodes(gm, OPS.sparse_linear.default)) == 2  # o_proj, shared_expert.down_proj
    assert _groups(report) == [
        {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"},
        {"mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert_gate", "mlp.gate"},
    ]
    # CPU route of the fused op: each sibling's own sparse op, concatenated and split again
    torch.testing.assert_close(fused, single, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [a for a in MOE_ARCHS if a.name != "qwen2_moe"], ids=lambda a: a.name)
def test_routed_experts_only_attention_fuses(lowered_graphs, arch):
    """Without a shared expert the block's router reads its input alone: only q/k/v fuse."""
    model, plan = _planned(arch.name)
    ids = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(5))
    single, _, _ = _compile(model, "grouped_mm", ids, lowered_graphs, fuse=False)
    fused, gm, report = _compile(model, "grouped_mm", ids, lowered_graphs, fuse=True)
    assert report.rewritten == len(plan.names)
    assert len(_nodes(gm, OPS.sparse_experts.default)) == 2
    assert [len(g) for g in _groups(report)] == [3]
    torch.testing.assert_close(fused, single, rtol=0, atol=0)
