"""Bad input: unsupported linears compile dense with one warning; a plan refuses another architecture."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import wisparse_compile as wsc
from tests.archs import BY_NAME
from tests.conftest import token_batches
from wisparse_compile.backend import COMPILED_REPORTS


class _ScaledBlock(nn.Module):
    """A linear the pass cannot rewrite: ``addmm`` with alpha/beta scaling (weight [in, out])."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim) / dim**0.5)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight, beta=0.5, alpha=2.0).relu()


class _ScaledModel(nn.Module):
    def __init__(self, vocab: int = 256, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(_ScaledBlock(dim) for _ in range(2))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids).flatten(0, 1)
        for block in self.blocks:
            x = block(x)
        return x


def test_all_unsupported_linears_compile_dense_with_one_warning():
    torch.manual_seed(0)
    model = _ScaledModel().eval()
    plan = wsc.calibrate(model, token_batches(1, batch=2, length=8), wsc.SparsityConfig(sparsity=0.5))
    assert sorted(plan.names) == ["blocks.0", "blocks.1"] and set(plan.in_dims.values()) == {0}
    wsc.attach(model, plan)
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(model, backend="wisparse", fullgraph=True)(ids)
        dense = model(ids)
    ours = [w for w in caught if "wisparse" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert "none of the 2 planned linears" in str(ours[0].message)
    assert "addmm with alpha/beta scaling" in str(ours[0].message)
    report = COMPILED_REPORTS[-1]
    assert report.rewritten == 0 and all(d.reason == "addmm with alpha/beta scaling" for d in report.decisions)
    torch.testing.assert_close(out, dense)


def test_plan_from_one_architecture_refuses_another():
    llama, mistral = BY_NAME["llama"].build(), BY_NAME["mistral"].build()  # same parameter names and shapes
    plan = wsc.calibrate(llama, token_batches(1, batch=1, length=8), wsc.SparsityConfig(sparsity=0.5))
    with pytest.raises(wsc.PlanError, match="calibrated for LlamaForCausalLM, this model is MistralForCausalLM"):
        wsc.attach(mistral, plan)
