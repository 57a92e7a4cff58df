"""The forms in which a linear (an activation contracted with a weight) appears.

One table serves both the eager side (calibration and the masked reference see calls through a
``TorchFunctionMode``) and the compiler side (the FX pass sees ``call_function`` nodes of the
Dynamo graph): both observe the same torch-level calls, so a linear that calibration planned is
one the pass can rewrite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import operator

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from .mask import expert_of_rows


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
BMM_WEIGHT_FIRST = LinearForm("bmm", (torch.bmm,), x_arg=1, weight_arg=0, bias_arg=None, weight_in_dim=2)
BMM_WEIGHT_SECOND = LinearForm("bmm", (torch.bmm,), x_arg=0, weight_arg=1, bias_arg=None, weight_in_dim=1)
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


@dataclass(frozen=True)
class LinearCall:
    """One resolved linear call: its form, input, root weight parameter, bias and input-channel dim.

    row_experts: for stacked expert weights [E, ...], the expert of each row of ``x`` (its rows
        being ``x.numel() // in_features``); None for plain linears.
    """

    form: LinearForm
    x: Any
    weight: torch.Tensor
    bias: Any
    in_dim: int
    row_experts: torch.Tensor | None = None


class WeightViews:
    """Eager dataflow for ``TorchFunctionMode`` observers: follows watched weights through views.

    ``watched(tensor)`` says whether a tensor is a weight of interest. ``record`` notes the
    result of a permuting view of a watched weight (or of such a view), and of indexing a stacked
    [E, ...] weight by expert (``W[e]``: one expert; ``W[expert_ids]``: gathered per row);
    ``resolve`` turns a call into a ``LinearCall`` when its weight operand leads back to a
    watched weight.
    """

    def __init__(self, watched: Callable[[Any], bool]) -> None:
        self.watched = watched
        # view -> (root, source dims, experts: None | int | 1-D index tensor)
        self._views: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _root(self, t: Any) -> tuple[torch.Tensor, tuple[int, ...], Any] | None:
        if not isinstance(t, torch.Tensor):
            return None
        if self.watched(t):
            return t, tuple(range(t.dim())), None
        return self._views.get(t)

    def record(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None, result: Any) -> None:
        if not args or not isinstance(result, torch.Tensor):
            return
        if func is torch.Tensor.__getitem__ and len(args) == 2:
            self._record_expert_index(args[0], args[1], result)
            return
        kind = view_kind(func)
        if kind is None:
            return
        root = self._root(args[0])
        if root is None:
            return
        extra = tuple(args[1:]) + tuple((kwargs or {}).values())
        dims = view_dims(kind, args[0].dim(), extra)
        if dims is not None:
            weight, source, experts = root
            self._views[result] = (weight, tuple(source[d] for d in dims), experts)

    def _record_expert_index(self, w: Any, index: Any, result: torch.Tensor) -> None:
        root = self._root(w)
        if root is None or root[0].dim() != 3 or root[2] is not None or root[1][0] != 0:
            return
        weight, source, _ = root
        if isinstance(index, int) or (
            isinstance(index, torch.Tensor) and index.dim() == 0 and not index.is_floating_point()
        ):
            self._views[result] = (weight, source[1:], int(index))
        elif isinstance(index, torch.Tensor) and index.dim() == 1 and index.dtype in (torch.int32, torch.int64):
            self._views[result] = (weight, source, index)

    def resolve(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> LinearCall | None:
        form = form_of(func)
        if form is None:
            return self._expert_call(func, args, kwargs)
        x, w, b = call_operands(form, args, kwargs)
        root = self._root(w)
        if root is None or not isinstance(x, torch.Tensor) or w.dim() != 2:
            return None
        weight, source, experts = root
        if weight.dim() == 3 and not isinstance(experts, int):
            return None
        row_experts = None
        if isinstance(experts, int):  # one expert's [out, in] slice: every row is that expert's
            row_experts = torch.full((x.numel() // max(1, x.shape[-1]),), experts, dtype=torch.long, device=x.device)
        return LinearCall(form, x, weight, b, source[form.weight_in_dim], row_experts)

    def _expert_call(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> LinearCall | None:
        """Grouped mm of a whole stacked weight, or bmm of a gathered ``W[expert_ids]``."""
        if is_grouped_mm(func) and len(args) >= 2:
            x, offs, root = args[0], offs_operand(args, kwargs), self._root(args[1])
            if root is None or root[2] is not None or root[1][0] != 0 or not isinstance(offs, torch.Tensor):
                return None
            weight, source, _ = root
            rows = expert_of_rows(offs, x.shape[0], weight.shape[0])
            return LinearCall(GROUPED_MM, x, weight, None, source[GROUPED_MM.weight_in_dim], rows)
        if func in (torch.bmm, torch.Tensor.bmm) and len(args) == 2:
            for form in (BMM_WEIGHT_FIRST, BMM_WEIGHT_SECOND):
                root = self._root(args[form.weight_arg])
                if root is not None and isinstance(root[2], torch.Tensor) and root[1][0] == 0:
                    weight, source, experts = root
                    return LinearCall(form, args[form.x_arg], weight, None, source[form.weight_in_dim], experts)
        return None
