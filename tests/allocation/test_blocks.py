"""The allocation's view of a model (``allocation/blocks.py``): blocks, input-sharing groups, block calls."""

import pytest
import torch

from tests.allocation.conftest import block_setup, sensitive_model
from tests.conftest import token_batches
from wisparse_compile.allocation.blocks import discover_layout, first_tensor


def test_groups_are_the_linears_that_read_one_tensor():
    model = sensitive_model()
    stats, layout, calls, _, _ = block_setup(model, token_batches(2, seed=5))
    assert [b.prefix for b in layout.blocks] == [f"model.layers.{i}." for i in range(4)] and layout.outside == []
    groups = sorted(layout.blocks[0].groups, key=len)
    assert [len(g) for g in groups] == [1, 1, 2, 3]  # o, down, gated-MLP inputs, attention inputs
    assert groups[3] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    assert groups[2] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    block = layout.blocks[0]
    assert block.size == sum(int(torch.Size(stats[n].shape).numel()) for n in block.linears)
    assert [len(calls[b.prefix].calls) for b in layout.blocks] == [2] * 4  # one call per batch, output kept
    assert [len(calls[b.prefix].outputs) for b in layout.blocks] == [2] * 4


def test_linears_outside_the_decoder_layers_are_listed_apart():
    model = sensitive_model()
    names = ["model.layers.0.mlp.down_proj", "lm_head"]
    layout, calls = discover_layout(model, names, token_batches(1, seed=5), torch.device("cpu"))
    assert [b.prefix for b in layout.blocks] == ["model.layers.0."] and layout.outside == ["lm_head"]
    assert list(calls) == ["model.layers.0."]


def test_masked_block_calls_feed_each_block_what_the_sparse_model_feeds_it():
    """With ``masks``, the captured calls are the masked model's: the first block sees the dense
    input (nothing upstream), later blocks see what sparsified blocks before them produced."""
    model = sensitive_model()
    batches = token_batches(2, seed=5)
    stats, layout, calls, weight_ids, thresholds = block_setup(model, batches)
    masks = {weight_ids[n]: thresholds(n, 0.5) for n in stats}
    _, masked = discover_layout(model, list(stats), batches, torch.device("cpu"), masks=masks)
    first, second = layout.blocks[0].prefix, layout.blocks[1].prefix
    assert torch.equal(masked[first].calls[0][0][0], calls[first].calls[0][0][0])
    assert not torch.allclose(masked[second].calls[0][0][0], calls[second].calls[0][0][0])
    assert not torch.allclose(masked[first].outputs[0], calls[first].outputs[0])  # the block's own masks count


def test_first_tensor_takes_the_hidden_state_and_names_what_it_got():
    hidden = torch.ones(2)
    assert first_tensor(hidden) is hidden and first_tensor((hidden, None)) is hidden
    with pytest.raises(TypeError, match="returned dict"):
        first_tensor({"hidden": hidden})
