"""The decoder's layer list is found generically, whatever the classes of its layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import wisparse_compile as wsc
from tests.conftest import token_batches
from wisparse_compile.model_structure import decoder_layer_prefixes


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.heads = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])  # a nested list is not the layer list

    def forward(self, x):
        return x + self.q(x) + sum(h(x) for h in self.heads)


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.in_proj = nn.Linear(8, 16)
        self.out_proj = nn.Linear(16, 8)

    def forward(self, x):
        return x + self.out_proj(torch.tanh(self.in_proj(x)).cumsum(1))


class _Hybrid(nn.Module):
    """Layers of two classes; a small list of unrelated modules beside them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.layers = nn.ModuleList([_Recurrent(), _Attention(), _Recurrent(), _Attention()])
        self.heads = nn.ModuleList([nn.Linear(8, 32)])

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.heads[0](x)


def test_mixed_classes_are_the_decoder_layers():
    assert decoder_layer_prefixes(_Hybrid()) == [f"layers.{i}." for i in range(4)]


def test_no_layer_list():
    assert decoder_layer_prefixes(nn.Sequential(nn.Linear(4, 4))) == []
    assert decoder_layer_prefixes(nn.ModuleList([nn.ReLU()])) == []  # a list without parameters


def test_hybrid_calibrates_every_layer_linear_without_configuration():
    model = _Hybrid()
    plan = wsc.calibrate(model, token_batches(2, batch=2, length=8, vocab=32), wsc.SparsityConfig(sparsity=0.5, method="teal"))
    expected = sorted(n.removesuffix(".weight") for n, p in model.named_parameters()
                      if n.startswith("layers.") and n.endswith(".weight"))
    assert sorted(plan.names) == expected and len(expected) == 10
    assert sorted(plan.stats["allocation"]["block_sparsities"]) == [f"layers.{i}." for i in range(4)]
    assert all(s == pytest.approx(0.5) for s in plan.stats["allocation"]["block_sparsities"].values())
