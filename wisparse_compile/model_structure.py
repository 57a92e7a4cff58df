"""Generic facts about a model's structure: the layers that decode, and parameter names.

No architecture names. A model's *layer lists* are its stacks of repeated blocks: each
``nn.ModuleList`` whose members are blocks holding parameters (not bare linears: a list of those
is a set of heads or adapters beside the layers), outside any other such list. Whatever the
classes in a list: a hybrid's mixes attention layers with state-space (Jamba, Zamba2) or others.

The layers that decode are those of the module that produces the next token's hidden states,
the one transformers' ``get_decoder()`` returns (followed until it returns itself): an
encoder-decoder's decoder, a vision-language model's language model, a causal LM's body. Never
the largest list: whisper-large-v3-turbo's encoder (32 layers) outweighs its decoder (4), and it
runs once per input, not once per token. A model without ``get_decoder`` (a plain ``nn.Module``)
decodes with its only layer list; where the rule finds several it raises, naming them and the
``SparsityConfig(include=...)`` that picks one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn


class LayerChoiceError(ValueError):
    """Nothing tells which of the model's layer lists decodes (several in its decoder, or none there)."""


@dataclass(frozen=True)
class LayerList:
    """One stack of repeated blocks: its ``named_modules`` name and the list."""

    name: str
    layers: nn.ModuleList

    @property
    def prefixes(self) -> list[str]:
        """Name prefixes of its blocks: ``"model.layers.0."``, ..."""
        return [f"{self.name}.{i}." if self.name else f"{i}." for i in range(len(self.layers))]

    @property
    def include(self) -> str:
        """The ``SparsityConfig.include`` pattern that plans exactly this list's linears."""
        return rf"^{re.escape(self.name)}\." if self.name else r"^\d+\."

    def describe(self) -> str:
        size = sum(p.numel() for p in self.layers.parameters())
        return f"{self.name or '<root>'} ({len(self.layers)} layers, {size:,} parameters)"


def _holds_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _is_block(module: nn.Module) -> bool:
    """A block holds parameterised submodules, or parameters of its own when it is not one of
    torch's single layers (``torch.nn``'s Linear, Embedding, norms, convolutions)."""
    if any(_holds_parameters(child) for child in module.children()):
        return True
    single_layer = type(module) is not nn.Module and type(module).__module__.startswith("torch.")
    return not single_layer and _holds_parameters(module)


def layer_lists(model: nn.Module) -> list[LayerList]:
    """Every stack of repeated layers in the model (lists nested inside one are part of it).

    Lists of blocks; a list of single layers (bare linears, norms) counts only in a model that
    has no list of blocks: beside a decoder's layers it is a set of heads or adapters."""
    found: list[LayerList] = []
    singles: list[LayerList] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not _holds_parameters(module):
            continue
        if any(name.startswith(f"{outer.name}.") or not outer.name for outer in found + singles):
            continue  # inside a list already found (named_modules visits parents first)
        (found if any(_is_block(m) for m in module) else singles).append(LayerList(name, module))
    return found or singles


def decoder_name(model: nn.Module) -> str:
    """``named_modules`` name of the module that produces the next token's hidden states ("" for
    the model itself): transformers' ``get_decoder()``, followed while it returns a submodule."""
    names = {id(m): n for n, m in model.named_modules()}
    current: nn.Module = model
    for _ in range(len(names)):
        get_decoder = getattr(current, "get_decoder", None)
        if not callable(get_decoder):
            break
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError, TypeError, ValueError):
            break  # a class whose lookup fails names no decoder
        if decoder is current or not isinstance(decoder, nn.Module) or id(decoder) not in names:
            break
        current = decoder
    return names[id(current)]


def _inside(name: str, scope: str) -> bool:
    return not scope or name == scope or name.startswith(f"{scope}.")


def decoding_layers(model: nn.Module) -> LayerList | None:
    """The layer list that decodes (module docstring); None when the model has no layer list.

    Raises ``LayerChoiceError`` when the decoder holds several layer lists or none of the model's
    (a model without ``get_decoder`` is its own decoder): the message names the candidates and the
    ``include`` that picks each."""
    lists = layer_lists(model)
    scope = decoder_name(model)
    candidates = [ll for ll in lists if _inside(ll.name, scope)]
    if len(candidates) == 1 or not lists:
        return candidates[0] if candidates else None
    where = f"its decoder {scope!r}" if scope else "it"
    if candidates:
        problem = f"{where} holds {len(candidates)} layer lists"
    else:  # the decoder is not a stack of layers: the lists elsewhere are not the ones that decode
        problem, candidates = f"its decoder {scope!r} holds none of its layer lists", lists
    raise LayerChoiceError(
        f"cannot tell which layers of {type(model).__name__} produce the next token's hidden states: {problem} ("
        + "; ".join(ll.describe() for ll in candidates)
        + "). Say which linears to plan with SparsityConfig(include=...), e.g. "
        + " or ".join(f"include=r'{ll.include}'" for ll in candidates)
    )


def planned_layer_lists(model: nn.Module, encoder: bool = False) -> list[LayerList]:
    """The layer lists calibration plans by default: the one that decodes, and with ``encoder``
    every other one too (an encoder-decoder's encoder, a vision or audio tower: they run on the
    input, once per prompt, not per generated token)."""
    decode = decoding_layers(model)
    if not encoder:
        return [decode] if decode is not None else []
    return layer_lists(model)


def decoder_layer_prefixes(model: nn.Module, encoder: bool = False) -> list[str]:
    """Name prefixes (``"model.layers.0."``, ...) of the layers calibration plans by default
    (``planned_layer_lists``); [] when the model has no layer list (then calibration needs an
    explicit ``include`` pattern)."""
    return [p for ll in planned_layer_lists(model, encoder) for p in ll.prefixes]


def block_prefixes(model: nn.Module, names: list[str]) -> list[str]:
    """Prefixes of the layers, in any layer list, that hold one of the linears ``names``: the
    blocks of a plan, wherever ``SparsityConfig.include`` put its linears."""
    return [p for ll in layer_lists(model) for p in ll.prefixes if any(f"{n}.".startswith(p) for n in names)]


def parameter_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its first ``named_parameters`` name (tied weights keep the first name)."""
    return {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}


def linear_name(param_name: str) -> str:
    """Plan key of a weight: the parameter name without a trailing ``.weight``."""
    return param_name.removesuffix(".weight")


def find_weight(model: nn.Module, name: str) -> tuple[str, torch.nn.Parameter] | None:
    """Resolve a plan key to (parameter name, parameter), trying ``name.weight`` then ``name``."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for candidate in (f"{name}.weight", name):
        if candidate in params:
            return candidate, params[candidate]
    return None
