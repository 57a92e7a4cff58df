"""``weight_slots``: planned weights by place (module, attribute), stable where the tensors are not."""

import gc

import pytest
import torch

from wisparse_compile.weight_slots import (
    WatchedWeights, check_loadable, offloaded_weights, require_resident, weight_slots,
)


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(8, 4)
        self.proj = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 8, bias=False)
        self.head.weight = self.embed.weight  # tied, as many language-model heads are


def test_a_slot_names_every_place_of_its_weight():
    model = _Tied()
    slots = weight_slots(model, ["proj", "head", "embed.weight"])
    assert slots["proj"].places == ((model.proj, "weight"),) and slots["proj"].current() is model.proj.weight
    assert {(m, a) for m, a in slots["head"].places} == {(model.embed, "weight"), (model.head, "weight")}
    assert slots["embed.weight"].current() is model.embed.weight  # a key naming the parameter itself
    assert slots["proj"] == weight_slots(model, ["proj"])["proj"]  # equal by name and places: a stable key
    with pytest.raises(ValueError, match="'nope' names no parameter of _Tied: pass names from its named_parameters"):
        weight_slots(model, ["nope"])


def test_watched_weights_follow_a_slot_to_the_tensor_it_holds_now():
    """A hook that puts a new parameter into the module each forward (as accelerate's offloading
    does) is followed: the new tensor is found on its first miss. Activations are never weights."""
    model = _Tied()
    slots = weight_slots(model, ["proj"])
    watched = WatchedWeights(slots.values())
    assert watched.slot_of(model.proj.weight) is slots["proj"] and watched(model.proj.weight)
    assert watched.slot_of(model.proj.weight.detach()) is None  # a plain tensor: not a parameter
    assert not watched(model.proj.bias) and not watched(torch.randn(4, 4))
    old = model.proj.weight
    model.proj.weight = torch.nn.Parameter(old.detach().clone())
    assert watched.slot_of(model.proj.weight) is slots["proj"]
    del old
    gc.collect()
    assert len(watched._held) == 1  # held weakly: the replaced tensor is gone


def test_weights_on_meta_that_nothing_loads_are_refused_with_the_fix():
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"on the meta device and no accelerate hook loads them.*offload_folder"):
        check_loadable(model)
    check_loadable(torch.nn.Sequential(torch.nn.Linear(4, 4)))  # resident: fine
    assert offloaded_weights(model, ["0"]) == []  # meta, but not offloaded: nothing loads it either


def test_resident_weights_are_never_offloaded():
    model = _Tied()
    assert offloaded_weights(model, ["proj", "head", "missing"]) == []
    require_resident(model, ["proj", "head"])
