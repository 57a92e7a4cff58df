"""Generic facts about a model's structure: its decoder layers and parameter names.

No architecture names: the decoder layers are found as the ``nn.ModuleList`` holding the most
parameters, which is how every Hugging Face causal LM stacks its layers, whatever the classes in
it: a hybrid's list mixes attention layers with state-space (Jamba, Zamba2) or other layers.
"""

from __future__ import annotations

import torch
from torch import nn


def decoder_layer_prefixes(model: nn.Module) -> list[str]:
    """Name prefixes (``"model.layers.0."``, ...) of the model's decoder layers.

    Picks the ModuleList holding the most parameters (shared ones counted once), whatever the
    classes of its children; returns [] when the model has none with parameters (then calibration
    needs an explicit ``include`` pattern).
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size and (best is None or size > best[0]):
            best = (size, name, module)
    if best is None:
        return []
    _, name, layers = best
    return [f"{name}.{i}." if name else f"{i}." for i in range(len(layers))]


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
