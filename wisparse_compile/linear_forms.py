"""The forms in which a linear (an activation contracted with a weight) appears.

One table serves both the eager side (``observer.LinearObserver``: calibration, the masked
reference and the allocation see calls through a ``TorchFunctionMode``) and the compiler side (the
FX pass sees ``call_function`` nodes of the Dynamo graph): both observe the same torch-level calls,
so a linear that calibration planned is one the pass can rewrite. A leaf module: it imports
nothing from the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import operator

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LinearForm:
    """A call target that contracts ``x`` (last dim) with a weight.

    name: short label for reports.
    targets: the callables (as seen by Dynamo and by TorchFunctionMode).
    x_arg / weight_arg / bias_arg: positional indices (bias_arg None if the form has no bias).
    weight_in_dim: the dim of the weight operand (as passed, after any views) that is contracted
        with x's last dim, i.e. that indexes input channels.
    arg_names: keyword names of (x, weight, bias), for calls that pass them by keyword.
    """

    name: str
    targets: tuple[Callable[..., Any], ...]
    x_arg: int
    weight_arg: int
    bias_arg: int | None
    weight_in_dim: int
    arg_names: tuple[str, str, str] = ("input", "weight", "bias")


LINEAR = LinearForm("linear", (torch._C._nn.linear, F.linear), x_arg=0, weight_arg=1, bias_arg=2, weight_in_dim=1)
# A 1-D-convolution-style linear: ``addmm(b, x2d, W[in, out])`` with x flattened to 2-D.
ADDMM = LinearForm(
    "addmm", (torch.addmm, torch.Tensor.addmm), x_arg=1, weight_arg=2, bias_arg=0, weight_in_dim=0,
    arg_names=("mat1", "mat2", "input"),
)
# ``x @ W.T`` (bias, if any, added by a separate op) or ``x @ W[in, out]``.
MATMUL = LinearForm(
    "matmul", (operator.matmul, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm),
    x_arg=0, weight_arg=1, bias_arg=None, weight_in_dim=0, arg_names=("input", "other", "bias"),
)

FORMS: tuple[LinearForm, ...] = (LINEAR, ADDMM, MATMUL)

# Stacked expert weights [E, ...] (resolved by ``expert_call``, not by ``form_of``): a grouped mm of
# expert-sorted rows ``x [S, in]`` with ``W [E, in, out]`` as passed (offs: cumulative rows per
# expert), and ``bmm`` with the gathered ``W[expert_ids]`` first (``[S, out, in] @ x[S, in, 1]``)
# or second (``x[S, 1, in] @ [S, in, out]``).
GROUPED_MM = LinearForm("grouped_mm", (), x_arg=0, weight_arg=1, bias_arg=None, weight_in_dim=1)
BMM_WEIGHT_FIRST = LinearForm(
    "bmm", (torch.bmm,), x_arg=1, weight_arg=0, bias_arg=None, weight_in_dim=2, arg_names=("mat2", "input", "bias"),
)
BMM_WEIGHT_SECOND = LinearForm(
    "bmm", (torch.bmm,), x_arg=0, weight_arg=1, bias_arg=None, weight_in_dim=1, arg_names=("input", "mat2", "bias"),
)
# Keyword names of a grouped mm's x and weight: transformers' fallback op, F.grouped_mm, torch._grouped_mm.
GROUPED_MM_X_NAMES = ("input", "mat_a", "self")
GROUPED_MM_WEIGHT_NAMES = ("weight", "mat_b", "mat2")
_BY_TARGET: dict[Any, LinearForm] = {t: f for f in FORMS for t in f.targets}


def form_of(target: Any) -> LinearForm | None:
    """The linear form whose call target is ``target``, or None."""
    try:
        return _BY_TARGET.get(target)
    except TypeError:  # unhashable target
        return None


def is_grouped_mm(target: Any) -> bool:
    """Whether ``target`` is a grouped mm over stacked expert weights: ``torch._grouped_mm``,
    ``F.grouped_mm`` or a library's ``*::grouped_mm*`` custom op (not ours)."""
    if target is getattr(torch, "_grouped_mm", None) or target is getattr(F, "grouped_mm", None):
        return True
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        namespace, _, name = target._qualified_op_name.partition("::") if isinstance(
            target, torch._ops.OpOverloadPacket) else target.name().partition("::")
        return namespace != "wisparse" and name.startswith("grouped_mm") and not name.endswith("backward")
    return False


def offs_operand(args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> Any:
    """The ``offs`` operand of a grouped mm call."""
    return args[2] if len(args) > 2 else (kwargs or {}).get("offs")


def call_operands(form: LinearForm, args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> tuple[Any, Any, Any]:
    """(x, weight, bias) of one call or node, whether passed positionally or by keyword."""
    kwargs = kwargs or {}
    names = form.arg_names

    def pick(index: int | None, key: str) -> Any:
        if index is None:
            return None
        if index < len(args):
            return args[index]
        return kwargs.get(key)

    return pick(form.x_arg, names[0]), pick(form.weight_arg, names[1]), pick(form.bias_arg, names[2])


# Ops that only permute a weight's dims: name (call_method / Tensor method) -> dims of the view.
def _swap_last_two(ndim: int) -> tuple[int, ...]:
    dims = list(range(ndim))
    if ndim >= 2:
        dims[-2], dims[-1] = dims[-1], dims[-2]
    return tuple(dims)


def view_dims(kind: str, ndim: int, args: tuple[Any, ...]) -> tuple[int, ...] | None:
    """For a permuting view op ``kind`` applied to an ``ndim``-D tensor with extra ``args``: the
    source dim of each output dim, or None if ``kind`` is not a pure permutation we understand."""
    if kind in ("T", "t", "mT"):
        return _swap_last_two(ndim) if (ndim == 2 or kind == "mT") else None
    if kind in ("transpose", "swapaxes", "swapdims") and len(args) == 2 and all(isinstance(a, int) for a in args):
        a, b = (d % ndim for d in args)
        dims = list(range(ndim))
        dims[a], dims[b] = dims[b], dims[a]
        return tuple(dims)
    if kind == "permute":
        order = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        if len(order) == ndim and all(isinstance(a, int) for a in order):
            return tuple(d % ndim for d in order)
    return None


_VIEW_FUNCS: dict[Any, str] = {
    torch.Tensor.T.__get__: "T", torch.Tensor.mT.__get__: "mT",
    torch.Tensor.t: "t", torch.t: "t",
    torch.Tensor.transpose: "transpose", torch.transpose: "transpose",
    torch.Tensor.swapaxes: "swapaxes", torch.Tensor.swapdims: "swapdims",
    torch.Tensor.permute: "permute", torch.permute: "permute",
}


def view_kind(func: Any) -> str | None:
    """The permuting view a torch-function call target performs (eager side), or None."""
    try:
        return _VIEW_FUNCS.get(func)
    except TypeError:
        return None
