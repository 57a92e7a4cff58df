"""make_experts_traceable: switches "eager" experts where the class allows it, and otherwise leaves
the model as it is and says why (attach must not fail inside transformers)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import wisparse_compile as wsc
from tests.archs import BY_NAME, text_batches
from wisparse_compile.experts import has_stacked_experts, make_experts_traceable


def test_switches_eager_experts(caplog):
    model = BY_NAME["qwen3_moe"].build(experts_implementation="eager")
    with caplog.at_level(logging.WARNING, logger="wisparse_compile.experts"):
        assert make_experts_traceable(model) is True
    assert model.config._experts_implementation == "grouped_mm"
    assert any("switched it to 'grouped_mm'" in r.getMessage() for r in caplog.records)


def test_class_that_rejects_the_switch_is_left_as_it_is(monkeypatch, caplog):
    """A class whose code does not support set_experts_implementation (transformers would raise
    "does not support setting experts implementation"): no error, no switch, a warning with the reason."""
    model = BY_NAME["qwen3_moe"].build(experts_implementation="eager")
    monkeypatch.setattr(type(model), "_can_set_experts_implementation", classmethod(lambda cls: False))
    with pytest.raises(ValueError, match="does not support setting experts implementation"):
        model.set_experts_implementation("grouped_mm")  # what attach used to hit
    with caplog.at_level(logging.WARNING, logger="wisparse_compile.experts"):
        assert make_experts_traceable(model) is False
    assert model.config._experts_implementation == "eager"
    messages = [r.getMessage() for r in caplog.records]
    assert any("keeps its own experts code" in m and "does not support" in m for m in messages), messages


def test_a_refused_switch_is_reported_not_raised(monkeypatch, caplog):
    model = BY_NAME["qwen3_moe"].build(experts_implementation="eager")

    def refuse(self, implementation):
        raise ValueError("no grouped mm here")

    monkeypatch.setattr(type(model), "set_experts_implementation", refuse)
    with caplog.at_level(logging.WARNING, logger="wisparse_compile.experts"):
        assert make_experts_traceable(model) is False
    assert any("no grouped mm here" in r.getMessage() for r in caplog.records)


def test_convolution_weights_are_no_experts():
    """A state-space layer's conv1d weight is 3-D; it does not make a model a mixture of experts."""
    conv = nn.Sequential(nn.Conv1d(4, 4, 3, groups=4), nn.Linear(4, 4))
    assert not has_stacked_experts(conv)
    experts = nn.Module()
    experts.gate_up_proj = nn.Parameter(torch.zeros(4, 16, 8))  # [E, 2I, H]
    assert has_stacked_experts(experts)


def test_broadcast_parameters_are_no_experts():
    """3-D parameters with a leading 1 (a pooling head's probe, a cls token, position embeddings)
    broadcast over the batch; no graph groups them by expert."""
    vision = nn.Module()
    vision.probe = nn.Parameter(torch.zeros(1, 1, 8))
    vision.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
    vision.position_embeddings = nn.Parameter(torch.zeros(1, 17, 8))
    vision.proj = nn.Linear(8, 8)
    assert not has_stacked_experts(vision)


def test_attaching_to_a_model_without_experts_does_not_warn(caplog):
    """Gemma3's SigLIP tower holds a [1, 1, D] probe; attach says nothing about experts."""
    model = BY_NAME["gemma3"].build()
    assert any(p.dim() == 3 and p.shape[:2] == (1, 1) for n, p in model.named_parameters() if n.endswith("probe"))
    plan = wsc.calibrate(model, text_batches(model), wsc.SparsityConfig(sparsity=0.5, allocation=wsc.Uniform()))
    with caplog.at_level(logging.DEBUG, logger="wisparse_compile.experts"):
        wsc.attach(model, plan)
    assert not [r.getMessage() for r in caplog.records if r.name == "wisparse_compile.experts"]
