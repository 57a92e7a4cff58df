"""Output sensitivities and the ``Sensitivity`` strategy (``allocation/sensitivity.py``)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import wisparse_compile as wsc
from tests.allocation.conftest import block_setup, sensitive_model
from tests.conftest import token_batches
from wisparse_compile.allocation import split_batches
from wisparse_compile.allocation.blocks import Layout
from wisparse_compile.allocation.sensitivity import block_bounds, budgets_by_sensitivity, draw_next_tokens, output_sensitivities

CPU = torch.device("cpu")


def test_output_sensitivities_are_squared_loss_gradients_at_block_outputs():
    model = sensitive_model()
    batches = token_batches(2, seed=5)
    _, layout, calls, _, _ = block_setup(model, batches)
    weights = output_sensitivities(model, layout, calls, batches, CPU, seed=3)
    assert weights is not None and set(weights) == {b.prefix for b in layout.blocks}
    for block in layout.blocks:
        assert [w.shape for w in weights[block.prefix]] == [o.shape for o in calls[block.prefix].outputs]
        assert all(bool((w >= 0).all()) and float(w.sum()) > 0 for w in weights[block.prefix])
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    # the last block's output gradient, by hand: d(summed loss on the drawn next tokens)/d(hidden) through norm and head
    last = layout.blocks[-1].prefix
    args, kwargs = calls[last].calls[0]
    hidden = model.model.layers[-1](*args, **kwargs)
    hidden = (hidden[0] if isinstance(hidden, tuple) else hidden).detach().requires_grad_(True)
    flat = model.lm_head(model.model.norm(hidden))[:, :-1].reshape(-1, 256)
    drawn = draw_next_tokens(flat, seed=3)
    loss = torch.nn.functional.cross_entropy(flat, drawn, reduction="sum")
    (grad,) = torch.autograd.grad(loss, hidden)
    assert torch.allclose(weights[last][0], grad.pow(2), rtol=1e-4, atol=1e-10)


def test_sensitivities_are_seeded():
    model = sensitive_model()
    batches = token_batches(2, seed=5)
    _, layout, calls, _, _ = block_setup(model, batches)
    a, b, other = (output_sensitivities(model, layout, calls, batches, CPU, seed=s) for s in (3, 3, 4))
    last = layout.blocks[-1].prefix
    assert all(torch.equal(x, y) for x, y in zip(a[last], b[last]))
    assert not torch.allclose(a[last][0], other[last][0])


def test_default_wisparse_trades_budget_by_sensitivity_and_spares_the_sensitive_block():
    """Default wisparse: no search and no held-out tokens; the block whose updates are 8x larger gets
    the least sparsity and the budget holds."""
    model = sensitive_model()
    config = wsc.SparsityConfig(sparsity=0.5, method="wisparse", refinement_tokens=128)
    assert config.strategy == wsc.Sensitivity(band=0.1)
    batches = token_batches(6, seed=5)
    assert split_batches(batches, config) == (batches, [])
    plan = wsc.calibrate(model, batches, config)
    record = plan.stats["allocation"]
    assert record["kind"] == "sensitivity" and record["across_blocks"] == "sensitivity"
    assert record["split_error"] == "sensitivity" and "search" not in record
    blocks = record["block_sparsities"]
    assert blocks["model.layers.2."] < 0.5 and blocks["model.layers.2."] == min(blocks.values())
    assert all(0.4 - 1e-9 <= b <= 0.6 + 1e-9 for b in blocks.values())  # the band
    sizes = {b: sum(np.prod(plan.shapes[n]) for n in plan.names if n.startswith(b)) for b in blocks}
    assert sum(blocks[b] * sizes[b] for b in blocks) / sum(sizes.values()) == pytest.approx(0.5, abs=1e-6)


class _FixedPath:
    """A greedy path stand-in: its points are revealed as it is extended (first to the target, as
    ``BlockSplitter`` does)."""

    def __init__(self, budgets, errors, target=0.5):
        self.all_budgets, self.all_errors = budgets, errors
        self.extensions = 0
        self.extend_to(target)

    def extend_to(self, budget):
        k = next((i for i, b in enumerate(self.all_budgets) if b >= budget - 1e-9), len(self.all_budgets) - 1)
        if k + 1 > len(getattr(self, "budgets", [])):
            self.extensions += 1
        self.budgets, self.errors = self.all_budgets[: k + 1], self.all_errors[: k + 1]


def _two_blocks():
    return Layout([SimpleNamespace(prefix="a.", size=1), SimpleNamespace(prefix="b.", size=1)])


def test_budgets_by_sensitivity_extend_only_wanted_paths_and_stop_past_the_bound():
    """A cheap block is extended as far as the exchange rate wants, and a path that steps past
    max_block_sparsity (0.6 -> 0.95 over a 0.9 bound) stops there instead of extending forever."""
    cheap = _FixedPath([0.0, 0.3, 0.6, 0.95], [0.0, 0.01, 0.02, 0.03])
    costly = _FixedPath([0.0, 0.2, 0.4, 0.6, 0.8], [0.0, 1.0, 4.0, 9.0, 16.0])
    splitters = {"a.": SimpleNamespace(path=cheap), "b.": SimpleNamespace(path=costly)}
    budgets = budgets_by_sensitivity(_two_blocks(), splitters, 0.5, wsc.Sensitivity(max_block_sparsity=0.9, band=1.0))
    assert sum(budgets) / 2 == pytest.approx(0.5, abs=1e-9)
    assert budgets[0] == pytest.approx(0.6) and budgets[1] == pytest.approx(0.4)
    assert costly.budgets[-1] <= 0.6  # the costly block's path was not run further than needed


def test_band_holds_traded_budgets_near_the_target():
    """The exchange rate wants 0.9 / 0.1 for a near-free and a very costly block; band=0.1 holds
    them at 0.6 / 0.4 (the budget still met), while the block bounds alone (band=1.0) let them go."""
    def paths():
        grid = [round(0.1 * i, 1) for i in range(10)]
        return {"a.": SimpleNamespace(path=_FixedPath(grid, [0.001 * b for b in grid])),
                "b.": SimpleNamespace(path=_FixedPath(grid, [100.0 * b**2 for b in grid]))}

    free = budgets_by_sensitivity(_two_blocks(), paths(), 0.5, wsc.Sensitivity(band=1.0))
    assert free == pytest.approx([0.9, 0.1])
    banded = budgets_by_sensitivity(_two_blocks(), paths(), 0.5, wsc.Sensitivity(band=0.1))
    assert banded == pytest.approx([0.6, 0.4])
    assert block_bounds(wsc.Sensitivity(), 0.05) == pytest.approx((0.15, 0.0))
    for bad in (0.0, 1.5, None):
        with pytest.raises(ValueError, match="band must be in"):
            wsc.Sensitivity(band=bad)


class _HiddenStateModel(torch.nn.Module):
    """Decoder blocks, but the output is the hidden state (width 16), not logits over the 256 ids."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(256, 16)
        self.layers = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
                                          for _ in range(3))

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_without_logits_every_block_keeps_the_target_and_says_why(caplog):
    torch.manual_seed(0)
    model = _HiddenStateModel().eval()
    with caplog.at_level("WARNING"):
        plan = wsc.calibrate(model, token_batches(3, seed=2), wsc.SparsityConfig(sparsity=0.5, refinement_tokens=64))
    assert "not next-token logits" in caplog.text and "Sensitivity allocation cannot compare blocks" in caplog.text
    record = plan.stats["allocation"]
    assert record["across_blocks"] == "uniform (no output sensitivities)" and record["split_error"] == "mse"
    assert set(record["block_sparsities"].values()) == {0.5}
    assert plan.mean_sparsity() == pytest.approx(0.5, abs=0.005)


def test_next_token_targets_come_from_the_decoder_tokens_of_an_encoder_decoder_batch():
    """The logits of an encoder-decoder run over its decoder's tokens, so the targets do too."""
    from wisparse_compile.allocation.sensitivity import _labels

    decoder_ids = torch.tensor([[2, 7, 8, 9]])
    batch = {"input_ids": torch.tensor([[5, 6, 1, 1, 1, 1]]), "decoder_input_ids": decoder_ids,
             "decoder_attention_mask": torch.tensor([[1, 1, 1, 0]])}
    assert _labels(batch, torch.device("cpu")).tolist() == [[7, 8, -100]]
    assert _labels({"input_ids": torch.tensor([[5, 6, 7]])}, torch.device("cpu")).tolist() == [[6, 7]]
