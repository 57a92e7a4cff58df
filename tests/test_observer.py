"""Every eager observer of linear calls (calibration, masked_linears, candidate masks, input sharing)
sees the same calls: operands by keyword, weights through views (``x @ W.T``), inputs through views."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wisparse_compile as wsc
from tests.conftest import token_batches
from wisparse_compile.allocation import candidate_masks
from wisparse_compile.allocation.blocks import discover_layout
from wisparse_compile.mask import masked_input
from wisparse_compile.reference import masked_linears
from wisparse_compile.weight_slots import weight_slots

DIM, HIDDEN, VOCAB = 16, 32, 64


class _KeywordBlock(nn.Module):
    """A gated MLP whose linears take every operand by keyword or through a weight view."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(DIM, HIDDEN, bias=False)
        self.up = nn.Linear(DIM, HIDDEN, bias=False)
        self.down = nn.Linear(HIDDEN, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.view(-1, DIM)  # each sibling gets its own view of the same data
        gate = F.linear(input=flat, weight=self.gate.weight)
        up = torch.matmul(input=x.view(-1, DIM), other=self.up.weight.T)  # x @ W.T, by keyword
        return x + F.linear(input=F.silu(gate) * up, weight=self.down.weight, bias=None).view_as(x)


class _KeywordModel(nn.Module):
    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(_KeywordBlock() for _ in range(layers))
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


LINEARS = sorted(f"layers.{i}.{p}" for i in range(2) for p in ("gate", "up", "down"))


def _batches():
    return token_batches(2, batch=2, length=8, vocab=VOCAB)


def _manual_forward(model: _KeywordModel, ids: torch.Tensor, thresholds: dict[str, torch.Tensor]) -> torch.Tensor:
    """The masked model written out by hand: each linear's input masked by its thresholds."""
    x = model.embed(ids)
    for i, layer in enumerate(model.layers):
        flat = x.reshape(-1, DIM)
        gate = masked_input(flat, thresholds[f"layers.{i}.gate"]) @ layer.gate.weight.T
        up = masked_input(flat, thresholds[f"layers.{i}.up"]) @ layer.up.weight.T
        h = F.silu(gate) * up
        x = x + (masked_input(h, thresholds[f"layers.{i}.down"]) @ layer.down.weight.T).view_as(x)
    return model.head(x)


def test_calibration_sees_keyword_and_view_linears():
    model = _KeywordModel()
    plan = wsc.calibrate(model, _batches(), wsc.SparsityConfig(sparsity=0.5, method="teal"))
    assert sorted(plan.names) == LINEARS
    assert all(plan.in_dims[n] == 1 for n in LINEARS)
    achieved = plan.stats["calibration_sparsity"]
    assert all(abs(achieved[n] - plan.sparsities[n]) < 0.1 for n in LINEARS), (achieved, plan.sparsities)


def test_input_sharing_groups_view_siblings():
    """gate (F.linear on a view) and up (x @ W.T on another view of the same data) share an input."""
    model = _KeywordModel()
    layout, _ = discover_layout(model, LINEARS, _batches(), torch.device("cpu"))
    for i, block in enumerate(layout.blocks):
        assert sorted(map(sorted, block.groups)) == [
            [f"layers.{i}.down"], [f"layers.{i}.gate", f"layers.{i}.up"]]


def test_input_sharing_tells_new_data_from_shared():
    """Linears fed different data (equal in shape and values, but separate tensors) are not grouped."""

    class _Twins(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Module()])
            self.layers[0].a = nn.Linear(DIM, DIM)
            self.layers[0].b = nn.Linear(DIM, DIM)
            self.embed = nn.Embedding(VOCAB, DIM)

        def forward(self, input_ids):
            x = self.embed(input_ids)
            return self.layers[0].a(x.clone()) + self.layers[0].b(x.clone())

    layout, _ = discover_layout(_Twins(), ["layers.0.a", "layers.0.b"], _batches(), torch.device("cpu"))
    assert sorted(layout.blocks[0].groups) == [["layers.0.a"], ["layers.0.b"]]


def test_candidate_masks_mask_keyword_and_view_linears():
    model = _KeywordModel()
    g = torch.Generator().manual_seed(3)
    thresholds = {n: torch.rand(HIDDEN if n.endswith("down") else DIM, generator=g) for n in LINEARS}
    slots = weight_slots(model, LINEARS)
    ids = _batches()[0]
    with torch.no_grad():
        with candidate_masks({slots[n]: t for n, t in thresholds.items()}):
            out = model(ids)
        expected = _manual_forward(model, ids, thresholds)
        dense = model(ids)
    torch.testing.assert_close(out, expected)
    assert (out - dense).abs().max() > 1e-3


def test_masked_linears_masks_and_counts_keyword_and_view_linears():
    model = _KeywordModel()
    plan = wsc.calibrate(model, _batches(), wsc.SparsityConfig(sparsity=0.5, allocation=wsc.Uniform()))
    wsc.attach(model, plan, input_major=False)
    ids = _batches()[0]
    try:
        with torch.no_grad():
            with masked_linears() as mode:
                out = model(ids)
            expected = _manual_forward(model, ids, plan.channel_thresholds)
    finally:
        wsc.detach(model)
    torch.testing.assert_close(out, expected)
    assert sorted(mode.sparsity()) == LINEARS
    assert all(0.2 < s < 0.8 for s in mode.sparsity().values())


@pytest.mark.parametrize("observer", ["calibration", "masked_linears", "candidate_masks"])
def test_grouped_mm_by_keyword(observer):
    """A grouped mm over stacked experts with its operands by keyword is observed like a positional one."""
    grouped_mm = getattr(F, "grouped_mm", None)
    if grouped_mm is None:
        pytest.skip("this torch has no F.grouped_mm")

    class _Experts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layers = nn.ModuleList([nn.Module()])
            self.layers[0].w = nn.Parameter(torch.randn(2, DIM, DIM))  # [E, in, out]
            self.embed = nn.Embedding(VOCAB, DIM)

        def forward(self, input_ids):
            x = self.embed(input_ids).reshape(-1, DIM)
            offs = torch.tensor([x.shape[0] // 2, x.shape[0]], dtype=torch.int32)
            return grouped_mm(mat_a=x, mat_b=self.layers[0].w, offs=offs)

    model = _Experts()
    ids = _batches()[0]
    try:
        with torch.no_grad():
            grouped_mm(mat_a=torch.zeros(2, DIM), mat_b=model.layers[0].w, offs=torch.tensor([1, 2], dtype=torch.int32))
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"grouped mm does not run on this CPU build: {e}")
    plan = wsc.calibrate(model, _batches(), wsc.SparsityConfig(sparsity=0.5, allocation=wsc.Uniform()))
    assert plan.names == ["layers.0.w"] and list(plan.channel_thresholds["layers.0.w"].shape) == [2, DIM]
    if observer == "calibration":
        return
    t = plan.channel_thresholds["layers.0.w"]
    with torch.no_grad():
        x = model.embed(ids).reshape(-1, DIM)
        rows = torch.arange(x.shape[0]) >= x.shape[0] // 2
        expected = torch.cat([masked_input(x[~rows], t[0]) @ model.layers[0].w[0],
                              masked_input(x[rows], t[1]) @ model.layers[0].w[1]])
        if observer == "candidate_masks":
            with candidate_masks({weight_slots(model, ["layers.0.w"])["layers.0.w"]: t}):
                out = model(ids)
        else:
            wsc.attach(model, plan)
            try:
                with masked_linears():
                    out = model(ids)
            finally:
                wsc.detach(model)
    torch.testing.assert_close(out, expected)
