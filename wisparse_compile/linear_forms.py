"""The forms in which a linear (an activation contracted with a weight) appears.

One table serves both the eager side (calibration and the masked reference see calls through a
``TorchFunctionMode``) and the compiler side (the FX pass sees ``call_function`` nodes of the
Dynamo graph): both observe the same torch-level calls, so a linear that calibration planned is
one the pass can rewrite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LinearForm:
    """A call target that contracts ``x`` (last dim) with a weight.

    name: short label for reports.
    targets: the callables (as seen by Dynamo and by TorchFunctionMode).
    x_arg / weight_arg / bias_arg: positional indices (bias_arg None if the form has no bias).
    weight_in_dim: the dim of the weight that indexes input channels.
    """

    name: str
    targets: tuple[Callable[..., Any], ...]
    x_arg: int
    weight_arg: int
    bias_arg: int | None
    weight_in_dim: int


LINEAR = LinearForm("linear", (torch._C._nn.linear, F.linear), x_arg=0, weight_arg=1, bias_arg=2, weight_in_dim=1)

FORMS: tuple[LinearForm, ...] = (LINEAR,)
_BY_TARGET: dict[Any, LinearForm] = {t: f for f in FORMS for t in f.targets}


def form_of(target: Any) -> LinearForm | None:
    """The linear form whose call target is ``target``, or None."""
    try:
        return _BY_TARGET.get(target)
    except TypeError:  # unhashable target
        return None


def call_operands(form: LinearForm, args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> tuple[Any, Any, Any]:
    """(x, weight, bias) of one call or node, whether passed positionally or by keyword."""
    kwargs = kwargs or {}
    names = ("input", "weight", "bias")

    def pick(index: int | None, key: str) -> Any:
        if index is None:
            return None
        if index < len(args):
            return args[index]
        return kwargs.get(key)

    return pick(form.x_arg, names[0]), pick(form.weight_arg, names[1]), pick(form.bias_arg, names[2])
