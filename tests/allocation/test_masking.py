"""Candidate masks (``allocation/masking.py``): running a model under thresholds that are not a plan."""

import torch

from wisparse_compile.allocation.masking import candidate_masks
from wisparse_compile.mask import masked_input
from wisparse_compile.weight_slots import weight_slots


class _TwoLinears(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 4, bias=False)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return h @ self.b.weight.T  # the x @ W.T form, resolved to the weight like a linear


def test_listed_weights_see_masked_inputs_in_every_call_form_and_others_stay_dense():
    model = _TwoLinears()
    x = torch.randn(3, 8)
    slots = weight_slots(model, ["a", "b"])
    t_b = torch.full((8,), 0.3)
    with torch.no_grad():
        with candidate_masks({slots["b"]: t_b}):
            only_b = model(x)
        h = torch.relu(model.a(x))
        assert torch.equal(only_b, masked_input(h, t_b) @ model.b.weight.T)
        t_a = torch.linspace(0.0, 1.0, 8)
        with candidate_masks({slots["a"]: t_a, slots["b"]: t_b}):
            both = model(x)
        h = torch.relu(model.a(masked_input(x, t_a)))
        assert torch.equal(both, masked_input(h, t_b) @ model.b.weight.T)
        dense = model(x)  # after the context: nothing masked
        assert torch.equal(dense, torch.relu(model.a(x)) @ model.b.weight.T) and not torch.equal(dense, only_b)


def test_zero_thresholds_keep_every_nonzero_channel():
    model = _TwoLinears()
    x = torch.randn(3, 8)
    slots = weight_slots(model, ["a", "b"])
    zeros = {slots[n]: torch.zeros(8) for n in ("a", "b")}
    with torch.no_grad(), candidate_masks(zeros):
        out = model(x.abs() + 0.1)  # every |x_i| > 0: all kept
    with torch.no_grad():
        assert torch.equal(out, model(x.abs() + 0.1))
