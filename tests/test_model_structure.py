"""The layers that decode are found generically: whatever the classes of a decoder's layers, and in
models with several layer lists (a vision tower, a larger encoder) the list inside ``get_decoder()``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import wisparse_compile as wsc
from tests.archs import BY_NAME, ENCODER_DECODER_ARCHS, VLM_ARCHS, text_batches
from tests.conftest import token_batches
from wisparse_compile.allocation.blocks import discover_layout
from wisparse_compile.model_structure import LayerChoiceError, decoder_layer_prefixes, decoding_layers, layer_lists


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


def test_a_list_of_bare_linears_is_the_layer_list_only_where_there_is_no_other():
    """Beside the layers a list of linears is a set of heads (``_Hybrid.heads``); alone, it is the stack."""
    stack = nn.Module()
    stack.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    assert decoder_layer_prefixes(stack) == ["layers.0.", "layers.1."]


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


# Vision-language models and encoder-decoders: the list that decodes, never the larger one.
DECODING = {
    "llava": "model.language_model.layers", "idefics3": "model.text_model.layers",
    "gemma3": "model.language_model.layers", "bart": "model.decoder.layers", "t5": "decoder.block",
}


def _weights_under(model: nn.Module, prefixes: list[str]) -> list[str]:
    return sorted(n.removesuffix(".weight") for n, p in model.named_parameters()
                  if n.startswith(tuple(prefixes)) and n.endswith(".weight") and p.dim() == 2)


@pytest.mark.parametrize("arch", VLM_ARCHS + ENCODER_DECODER_ARCHS, ids=lambda a: a.name)
def test_the_layers_that_decode_are_the_language_model_or_decoder(arch):
    model = arch.build()
    decoding = decoding_layers(model)
    assert decoding is not None and decoding.name == DECODING[arch.name]
    assert decoder_layer_prefixes(model) == decoding.prefixes
    others = [ll for ll in layer_lists(model) if ll.name != decoding.name]
    assert len(others) == 1  # the vision tower's or the encoder's
    if model.config.is_encoder_decoder:  # the encoder is the larger stack: size does not decide
        size = lambda ll: sum(p.numel() for p in ll.layers.parameters())  # noqa: E731
        assert size(others[0]) > size(decoding)
    assert decoder_layer_prefixes(model, encoder=True) == others[0].prefixes + decoding.prefixes


def test_deep_encoder_plans_its_decoder_without_configuration():
    """4 encoder / 2 decoder layers, the encoder the larger: calibration plans every decoder linear,
    and the allocation splits within the decoder's layers (its blocks)."""
    model = BY_NAME["bart"].build()
    config = wsc.SparsityConfig(sparsity=0.5, method="teal", refinement_step=0.25)  # a short greedy path
    plan = wsc.calibrate(model, text_batches(model), config)
    decoder = [f"model.decoder.layers.{i}." for i in range(2)]
    assert sorted(plan.names) == _weights_under(model, decoder) and len(plan.names) == 20
    assert sorted(plan.stats["allocation"]["block_sparsities"]) == decoder


def test_include_and_plan_encoder_choose_the_blocks():
    """The allocation's blocks are the layers holding the planned linears, wherever ``include`` (or
    ``plan_encoder``) put them: the encoder's, or both stacks'."""
    model = BY_NAME["bart"].build()
    batches = text_batches(model)
    encoder = [f"model.encoder.layers.{i}." for i in range(4)]
    decoder = [f"model.decoder.layers.{i}." for i in range(2)]
    by_include = wsc.calibrate(model, batches, wsc.SparsityConfig(include=r"^model\.encoder\.layers\.", allocation=wsc.Uniform()))
    assert sorted(by_include.names) == _weights_under(model, encoder)
    layout, calls = discover_layout(model, by_include.names, batches, torch.device("cpu"))
    assert [b.prefix for b in layout.blocks] == encoder and not layout.outside
    assert all(len(calls[p].calls) == 1 for p in encoder)  # each block's call captured for its re-runs
    both = wsc.calibrate(model, batches, wsc.SparsityConfig(plan_encoder=True, allocation=wsc.Uniform()))
    assert sorted(both.names) == _weights_under(model, encoder + decoder)
    layout, _ = discover_layout(model, both.names, batches, torch.device("cpu"))
    assert [b.prefix for b in layout.blocks] == encoder + decoder


class _Stack(nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Recurrent() for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class _PlainEncoderDecoder(nn.Module):
    """Two layer lists and no ``get_decoder``: nothing tells which one decodes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.encoder, self.decoder = _Stack(3), _Stack(2)
        self.head = nn.Linear(8, 32)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        return self.head(self.decoder(x + self.encoder(x).mean(1, keepdim=True)))


def test_undecidable_layer_lists_raise_naming_them_and_the_include():
    model = _PlainEncoderDecoder()
    batches = token_batches(1, batch=2, length=8, vocab=32)
    with pytest.raises(LayerChoiceError) as caught:
        wsc.calibrate(model, batches, wsc.SparsityConfig(sparsity=0.5, allocation=wsc.Uniform()))
    message = str(caught.value)
    assert "encoder.layers (3 layers" in message and "decoder.layers (2 layers" in message
    assert r"include=r'^decoder\.layers\.'" in message
    plan = wsc.calibrate(model, batches, wsc.SparsityConfig(sparsity=0.5, method="teal", include=r"^decoder\.layers\."))
    assert sorted(plan.stats["allocation"]["block_sparsities"]) == ["decoder.layers.0.", "decoder.layers.1."]


def test_a_decoder_without_a_layer_list_does_not_fall_back_to_the_encoders():
    """``get_decoder()`` names a module holding no layer list: the encoder's list is not taken instead."""
    model = _PlainEncoderDecoder()
    del model.decoder
    model.get_decoder = lambda: model.head
    with pytest.raises(LayerChoiceError, match=r"its decoder 'head' holds none of its layer lists.*encoder\.layers"):
        decoder_layer_prefixes(model)
