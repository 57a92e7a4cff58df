"""Quantize a model's weights in place and undo it: the model API of ``attach(..., weights="int8"|"int4")``.

``QuantizeConfig`` (``config.py``) says what is quantized: the planned weights and, by default, the
output head (``get_output_embeddings()``). Each becomes an ``Int8Weight`` or ``Int4Weight``
(``quant.tensors``). A tied head (the output head's weight is the input embedding's) is untied for
this: the head gets its own quantized copy and the embedding keeps its float weight (an embedding
lookup on an int8 weight would dequantize the whole table per call); ``dequantize_model`` ties
them again. The original float parameters are kept (referenced, not copied) so ``detach`` restores
them exactly; ``keep_float=False`` frees them and ``detach`` then restores the dequantized values.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Iterable

import torch
from torch import nn

from ..config import QuantizeConfig
from ..model_structure import find_weight
from .tensors import WEIGHT_CLASSES, QuantizedWeight, from_torchao

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Quantization:
    """What ``quantize_model`` did to a model (``quantization_of(model)`` returns it).

    quantized: the names of the weights now quantized (the head's included);
    head: the output head's name if it was quantized, else None;
    untied: the head was tied to the input embedding and got its own quantized copy;
    skipped: name -> why it stays float; format: ``"int8"`` or ``"int4"``.
    """

    quantized: list[str]
    head: str | None
    untied: bool
    skipped: dict[str, str]
    format: str


class _Quantized:
    """What quantize_model changed on one model, so dequantize_model can undo it."""

    def __init__(self) -> None:
        # (module, attribute name, original parameter or None, its name)
        self.swaps: list[tuple[nn.Module, str, nn.Parameter | None, str]] = []
        self.summary: Quantization | None = None


_QUANTIZED: "weakref.WeakKeyDictionary[nn.Module, _Quantized]" = weakref.WeakKeyDictionary()


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def _head_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear):
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def _is_input_weight(model: nn.Module, weight: torch.Tensor) -> bool:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return isinstance(emb, nn.Module) and getattr(emb, "weight", None) is weight


def quantize_model(
    model: nn.Module, names: Iterable[str], config: QuantizeConfig, in_dims: dict[str, int] | None = None
) -> Quantization:
    """Replace the ``[out, in]`` weights named by ``names`` (plan keys: module or parameter names) and
    the head, if asked, with ``Int8Weight`` (``Int4Weight`` for ``config.weights="int4"``) parameters.

    Returns what it did (a ``Quantization``, also logged). Weights already in this format are kept,
    weights in another one are refused (re-quantizing codes would compound the error); torchao int8
    weights are converted without re-quantizing (int8 only); non-2-D weights (stacked experts) and ``[in, out]`` weights
    (``in_dims[name] == 0``: 1-D-convolution-style, the int8 layout is built from ``[out, in]``) are skipped and named.
    """
    record = _QUANTIZED.setdefault(model, _Quantized())
    targets = list(dict.fromkeys(names))
    head = _head_name(model) if config.head else None
    if head is not None and head not in targets:
        targets.append(head)
    done: list[str] = []
    skipped: dict[str, str] = {}
    untied = False
    for name in targets:
        found = find_weight(model, name)
        if found is None:
            raise ValueError(f"quantize_model: {name!r} names no weight of this {type(model).__name__}")
        module, attr = _owner(model, found[0])
        weight = module._parameters[attr]
        if isinstance(weight, QuantizedWeight):
            if weight.FORMAT != config.weights:
                raise ValueError(
                    f"quantize_model: {name!r} is already {weight.FORMAT}-quantized; detach(model) first to get the "
                    f"float weights back, then attach with weights={config.weights!r}"
                )
            done.append(name)
            continue
        if weight.dim() != 2:
            skipped[name] = f"{weight.dim()}-D weight (stacked experts stay in their float dtype)"
            continue
        if (in_dims or {}).get(name, 1) % 2 != 1:
            skipped[name] = f"[in, out] weight (1-D-convolution style): {config.weights} takes [out, in] linears"
            continue
        converted = from_torchao(weight) if config.weights == "int8" else None
        if converted is None and type(weight) not in (torch.Tensor, nn.Parameter):
            skipped[name] = f"weight is a {type(weight).__name__}, not a plain tensor{' or torchao int8 weight' if config.weights == 'int8' else ''}"
            continue
        if converted is None and not weight.is_floating_point():
            skipped[name] = f"weight dtype {weight.dtype} is not floating point"
            continue
        tied = _is_input_weight(model, weight)
        q = converted if converted is not None else WEIGHT_CLASSES[config.weights].from_float(weight)
        module._parameters[attr] = nn.Parameter(q, requires_grad=False)
        original = weight if (config.keep_float or tied) else None
        record.swaps.append((module, attr, original, name))
        untied |= tied
        done.append(name)
    summary = Quantization(done, head if head in done else None, untied, skipped, config.weights)
    record.summary = summary
    log.info(
        "wisparse: %s weights for %d linears (%s head%s)%s", config.weights, len(done),
        "with the" if summary.head else "without a", " untied from the input embedding, which stays float" if untied else "",
        f"; left float: {skipped}" if skipped else "",
    )
    return summary


def dequantize_model(model: nn.Module) -> list[str]:
    """Undo ``quantize_model``: the original float parameters back (tied heads tied again).

    With ``keep_float=False`` the dequantized values come back instead (logged). Returns the names.
    """
    record = _QUANTIZED.pop(model, None)
    if record is None:
        return []
    restored = []
    lossy = []
    for module, attr, original, name in reversed(record.swaps):
        current = module._parameters.get(attr)
        if original is not None:
            module._parameters[attr] = original
        elif isinstance(current, QuantizedWeight):
            module._parameters[attr] = nn.Parameter(current.dequantize().t().contiguous().t(), requires_grad=False)
            lossy.append(name)
        restored.append(name)
    if lossy:
        log.warning("wisparse: %d weights were quantized with keep_float=False: detach restored their %s values", len(lossy),
                    record.summary.format if record.summary else "quantized")
    return restored


def quantization_of(model: nn.Module) -> Quantization | None:
    """What ``quantize_model`` did to ``model`` (its returned summary), or None if it is not quantized."""
    record = _QUANTIZED.get(model)
    return None if record is None else record.summary
