"""The eager masked reference (``reference.py``): ``masked_linears`` against masks computed by hand, and
``measure_sparsity`` on a calibrated model."""

import pytest
import torch
from torch import nn

import wisparse_compile as wsc
from tests.conftest import calibrated_llama, token_batches
from wisparse_compile.eval import overall_sparsity
from wisparse_compile.reference import masked_linears, measure_sparsity

X = torch.tensor([[1.0, -0.25, 3.0, 0.0]])


class _Chain(nn.Module):
    """layers.0 (identity, 4 -> 4), layers.1 (4 -> 2), then an unplanned head (2 -> 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4, bias=False), nn.Linear(4, 2, bias=False)])
        self.head = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.layers[0].weight.copy_(torch.eye(4))
            self.layers[1].weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 2.0, 0.0]]))
            self.head.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers[1](self.layers[0](x)))


def _chain() -> nn.Module:
    """The chain with a hand-made plan attached: channel i is kept iff |x_i| > t_i."""
    model = _Chain().eval()
    thresholds = {"layers.0": torch.tensor([0.5, 0.5, 2.0, 0.0]), "layers.1": torch.full((4,), 0.1)}
    plan = wsc.SparsityPlan(
        channel_thresholds=thresholds, sparsities=dict.fromkeys(thresholds, 0.5),
        shapes={"layers.0": [4, 4], "layers.1": [2, 4]}, model_class="_Chain", method="teal",
    )
    return wsc.attach(model, plan)


def test_masked_linears_masks_each_planned_input_and_counts_what_it_pruned():
    """layers.0 keeps x's channels 0 and 2 (|1| > 0.5, |3| > 2; a 0 is never > 0); layers.1 then sees
    [1, 0, 3, 0] and keeps channels 0 and 2; the head is not planned and not counted."""
    model = _chain()
    with torch.no_grad(), masked_linears() as mode:
        out = model(X)
    torch.testing.assert_close(out, torch.tensor([[(1.0 + 3.0) + (1.0 + 6.0)]]))
    assert mode.pruned == {"layers.0": 2.0, "layers.1": 2.0} and mode.seen == {"layers.0": 4.0, "layers.1": 4.0}
    assert mode.sparsity() == {"layers.0": 0.5, "layers.1": 0.5}
    with torch.no_grad():
        assert model(X).item() == pytest.approx(3.75 + 7.25)  # outside the context: dense again


def test_apply_false_counts_on_dense_activations_and_changes_nothing():
    model = _chain()
    with torch.no_grad(), masked_linears(apply=False) as mode:
        out = model(X)
    torch.testing.assert_close(out, torch.tensor([[3.75 + 7.25]]))  # layers.1 of the unmasked [1, -0.25, 3, 0]
    assert mode.sparsity() == {"layers.0": 0.5, "layers.1": 0.25}  # only the 0 is at or below 0.1


def test_max_rows_masks_decode_sized_calls_only():
    model = _chain()
    two_rows = torch.cat([X, X])
    with torch.no_grad(), masked_linears(max_rows=1) as mode:
        dense = model(two_rows)
        masked = model(X)
    torch.testing.assert_close(dense, torch.full((2, 1), 11.0))
    torch.testing.assert_close(masked, torch.tensor([[11.0]]))
    assert mode.seen == {"layers.0": 4.0, "layers.1": 4.0}  # the two-row call was not counted


def test_nan_is_kept_not_pruned():
    model = _chain()
    with torch.no_grad(), masked_linears() as mode:
        out = model(torch.tensor([[float("nan"), 0.0, 0.0, 0.0]]))
    assert out.isnan().all() and mode.pruned["layers.0"] == 3.0


def test_measure_sparsity_masked_and_on_dense_activations():
    model = _chain()
    assert measure_sparsity(model, [X, X]) == {"layers.0": 0.5, "layers.1": 0.5}
    assert measure_sparsity(model, [X], masked=False) == {"layers.0": 0.5, "layers.1": 0.25}


def test_achieved_sparsity_on_held_out_tokens():
    model, plan = calibrated_llama()
    held_out = token_batches(4, seed=99)

    # every linear masked at once, as compiled (thresholds are calibrated on the masked model):
    # each linear hits its allocated sparsity and the parameter-weighted budget holds
    achieved = measure_sparsity(model, held_out)
    for name, value in achieved.items():
        assert value == pytest.approx(plan.sparsities[name], abs=0.03), name
    assert overall_sparsity(achieved, plan.shapes) == pytest.approx(0.5, abs=0.02)
