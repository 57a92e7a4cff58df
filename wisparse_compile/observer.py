"""The eager observer of linear calls: one ``TorchFunctionMode`` skeleton for every eager use.

Calibration (score histograms), the masked reference (``masked_linears``), the allocation's
candidate masks and its input-sharing discovery all watch the same thing: calls that contract an
activation with a weight of interest, in any form of ``linear_forms`` (``F.linear``, ``addmm``,
``x @ W.T``, grouped mm and ``bmm`` over stacked experts), with operands passed positionally or
by keyword. ``LinearObserver`` resolves each call once (``LinearCallResolver``), hands it to the
use's ``on_linear`` (which may return a replacement input), runs the call and records views of
watched weights so later calls through them resolve too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .linear_forms import (
    BMM_WEIGHT_FIRST, BMM_WEIGHT_SECOND, GROUPED_MM, GROUPED_MM_WEIGHT_NAMES, GROUPED_MM_X_NAMES, LinearForm,
    form_of, is_grouped_mm, offs_operand, view_dims, view_kind,
)
from .mask import expert_of_rows

# Where an operand was passed: a positional index or a keyword name.
ArgSlot = int | str


@dataclass(frozen=True)
class LinearCall:
    """One resolved linear call: its form, input, root weight parameter, bias and input-channel dim.

    x_slot: where the call passed ``x`` (positional index or keyword), so a use can replace it.
    row_experts: for stacked expert weights [E, ...], the expert of each row of ``x`` (its rows
        being ``x.numel() // in_features``); None for plain linears.
    """

    form: LinearForm
    x: torch.Tensor
    weight: torch.Tensor
    bias: Any
    in_dim: int
    x_slot: ArgSlot
    row_experts: torch.Tensor | None = None

    def with_input(self, args: tuple[Any, ...], kwargs: dict[str, Any], x: torch.Tensor) -> tuple[tuple, dict]:
        """The call's (args, kwargs) with its activation operand replaced by ``x``."""
        if isinstance(self.x_slot, int):
            return (*args[: self.x_slot], x, *args[self.x_slot + 1 :]), kwargs
        return args, {**kwargs, self.x_slot: x}


def _operand(args: tuple[Any, ...], kwargs: dict[str, Any], index: int | None, names: tuple[str, ...]) -> tuple[Any, ArgSlot | None]:
    """(value, slot) of an operand at positional ``index`` or under one of the keyword ``names``."""
    if index is None:
        return None, None
    if index < len(args):
        return args[index], index
    for name in names:
        if name in kwargs:
            return kwargs[name], name
    return None, None


class LinearCallResolver:
    """Eager dataflow: turns a torch-function call into a ``LinearCall`` when its weight operand
    leads back to a watched weight, following views.

    ``watched(tensor)`` says whether a tensor is a weight of interest. ``record`` notes the result
    of a permuting view of a watched weight (or of such a view), and of indexing a stacked [E, ...]
    weight by expert (``W[e]``: one expert; ``W[expert_ids]``: gathered per row).
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
        kwargs = kwargs or {}
        form = form_of(func)
        if form is None:
            return self._expert_call(func, args, kwargs)
        x, x_slot = _operand(args, kwargs, form.x_arg, (form.arg_names[0],))
        w, _ = _operand(args, kwargs, form.weight_arg, (form.arg_names[1],))
        b, _ = _operand(args, kwargs, form.bias_arg, (form.arg_names[2],))
        root = self._root(w)
        if root is None or not isinstance(x, torch.Tensor) or w.dim() != 2:
            return None
        weight, source, experts = root
        if weight.dim() == 3 and not isinstance(experts, int):
            return None
        row_experts = None
        if isinstance(experts, int):  # one expert's [out, in] slice: every row is that expert's
            row_experts = torch.full((x.numel() // max(1, x.shape[-1]),), experts, dtype=torch.long, device=x.device)
        return LinearCall(form, x, weight, b, source[form.weight_in_dim], x_slot, row_experts)

    def _expert_call(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> LinearCall | None:
        """Grouped mm of a whole stacked weight, or bmm of a gathered ``W[expert_ids]``."""
        if is_grouped_mm(func):
            x, x_slot = _operand(args, kwargs, 0, GROUPED_MM_X_NAMES)
            w, _ = _operand(args, kwargs, 1, GROUPED_MM_WEIGHT_NAMES)
            offs, root = offs_operand(args, kwargs), self._root(w)
            if (root is None or root[2] is not None or root[1][0] != 0 or not isinstance(offs, torch.Tensor)
                    or not isinstance(x, torch.Tensor)):
                return None
            weight, source, _ = root
            rows = expert_of_rows(offs, x.shape[0], weight.shape[0])
            return LinearCall(GROUPED_MM, x, weight, None, source[GROUPED_MM.weight_in_dim], x_slot, rows)
        if func in (torch.bmm, torch.Tensor.bmm):
            for form in (BMM_WEIGHT_FIRST, BMM_WEIGHT_SECOND):
                w, _ = _operand(args, kwargs, form.weight_arg, (form.arg_names[1],))
                x, x_slot = _operand(args, kwargs, form.x_arg, (form.arg_names[0],))
                root = self._root(w)
                if root is not None and isinstance(root[2], torch.Tensor) and root[1][0] == 0 and isinstance(x, torch.Tensor):
                    weight, source, experts = root
                    return LinearCall(form, x, weight, None, source[form.weight_in_dim], x_slot, experts)
        return None


class LinearObserver(TorchFunctionMode):
    """Context manager: calls ``on_linear`` for every linear call on a watched weight.

    Subclasses supply ``on_linear(call)``: return a replacement for the call's input (e.g. the
    masked input), or None to run the call unchanged. Everything else (resolving the call's form
    and operands, positional or keyword; following views of watched weights) happens here once.
    """

    def __init__(self, watched: Callable[[Any], bool]) -> None:
        super().__init__()
        self.resolver = LinearCallResolver(watched)

    def on_linear(self, call: LinearCall) -> torch.Tensor | None:
        raise NotImplementedError

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = self.resolver.resolve(func, args, kwargs)
        if call is not None:
            x = self.on_linear(call)
            if x is not None:
                args, kwargs = call.with_input(tuple(args), kwargs, x)
        result = func(*args, **kwargs)
        self.resolver.record(func, args, kwargs, result)
        return result
