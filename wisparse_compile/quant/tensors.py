"""The quantized weight tensors: ``Int8Weight`` and ``Int4Weight``, and torchao's int8 tensors converted to them.

Each looks like the ``[out, in]`` float weight it replaces (same shape and dtype) but stores the
codes ``qdata`` (input-major) and fp32 ``scale`` of its format (``quant.primitives``). The compiler
pass (``passes/rewrite_linears.py``) picks ``wisparse::sparse_linear`` with the weight's layout for
any linear whose weight is one of these (with the plan's thresholds if it has one, dense if not),
reading ``qdata`` and ``scale`` straight from the subclass. Everything else that touches the weight
(an eager forward, ``masked_linears``, a linear the pass leaves dense) goes through
``__torch_dispatch__`` (one ``QuantizedWeight`` base serves both formats), which dequantizes:
eager calls compute with the same quantized values, never with raw codes, only slower.

torchao's int8 weight-only tensors are converted on entry where its classes expose the int data and
per-channel scales (``from_torchao``): same codes, no re-quantization.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_map_only

from ..planned import PLAN_ATTRIBUTE
from .primitives import INT4_GROUP_SIZE, dequantize_int4, dequantize_int8, quantize_int4, quantize_int8


class QuantizedWeight(torch.Tensor):
    """An ``[out, in]`` weight stored as codes ``qdata`` (input-major) and fp32 ``scale``: the base
    of ``Int8Weight`` and ``Int4Weight``, which say how to check, quantize and dequantize them.

    Reports the float dtype and ``[out, in]`` shape of the weight it stands for (strides of an
    input-major layout), so checks in model code pass; any op on it runs on the dequantized weight,
    except the layout-keeping ones (detach, clone, device and dtype moves) that keep it quantized.
    Traceable (``__tensor_flatten__``): torch.compile sees it as a graph input and the wisparse pass
    reads ``qdata``/``scale`` off it.
    """

    FORMAT = ""
    qdata: torch.Tensor
    scale: torch.Tensor
    out_features: int

    @staticmethod
    def __new__(cls, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, out_features: int | None = None):
        k, n = qdata.shape[0], cls._out_features(qdata, out_features)
        return torch.Tensor._make_wrapper_subclass(
            cls, (n, k), strides=(1, n), dtype=dtype, device=qdata.device, requires_grad=False
        )

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, out_features: int | None = None) -> None:
        self.out_features = self._out_features(qdata, out_features)
        self._check(qdata, scale, self.out_features)
        self.qdata = qdata
        self.scale = scale

    @staticmethod
    def _out_features(qdata: torch.Tensor, out_features: int | None) -> int:
        raise NotImplementedError

    @staticmethod
    def _check(qdata: torch.Tensor, scale: torch.Tensor, out_features: int) -> None:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def _stable_hash_for_caching(self) -> str:
        """AOT autograd's cache key for this input: metadata only (the values are inputs, not constants)."""
        return f"{type(self).__name__}/{self.dtype}/{tuple(self.shape)}/{self.device.type}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, {self.FORMAT} input-major)"

    def __tensor_flatten__(self) -> tuple[list[str], Any]:
        return ["qdata", "scale"], (self.dtype, self.out_features)

    @classmethod
    def __tensor_unflatten__(cls, inner: dict[str, torch.Tensor], meta: Any, outer_size: Any, outer_stride: Any) -> "QuantizedWeight":
        dtype, out_features = meta
        return cls(inner["qdata"], inner["scale"], dtype, out_features)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func in (aten.detach.default, aten.alias.default, aten.clone.default):
            w = args[0]
            return _keeping_plan(w, type(w)(func(w.qdata), func(w.scale), w.dtype, w.out_features))
        if func is aten._to_copy.default:
            w = args[0]
            device = kwargs.get("device") or w.device
            dtype = kwargs.get("dtype") or w.dtype
            if not dtype.is_floating_point:
                return func(w.dequantize(), **kwargs)
            return _keeping_plan(w, type(w)(w.qdata.to(device), w.scale.to(device), dtype, w.out_features))
        if func is aten.copy_.default and isinstance(args[0], QuantizedWeight):
            raise RuntimeError(
                f"in-place writes into a {args[0].FORMAT}-quantized weight are not supported: detach(model) first "
                "(it restores the float weights), change them, and attach again"
            )
        plain = tree_map_only(QuantizedWeight, lambda w: w.dequantize(), (args, kwargs))
        return func(*plain[0], **plain[1])


def _keeping_plan(source: QuantizedWeight, result: QuantizedWeight) -> QuantizedWeight:
    """``result`` with ``source``'s plan slot (``planned.py``), if it has one: ``module.to()`` moves a
    subclass parameter by swapping in a new tensor's contents, attributes included (through
    ``_to_copy``, then ``detach`` to make it a Parameter), so a layout-keeping copy keeps the plan."""
    plan = getattr(source, PLAN_ATTRIBUTE, None)
    if plan is not None:
        setattr(result, PLAN_ATTRIBUTE, plan)
    return result


class Int8Weight(QuantizedWeight):
    """An ``[out, in]`` weight stored as int8 codes ``qdata [in, out]`` and fp32 ``scale [out]``."""

    FORMAT = "int8"

    @staticmethod
    def _out_features(qdata: torch.Tensor, out_features: int | None) -> int:
        return qdata.shape[1]

    @staticmethod
    def _check(qdata: torch.Tensor, scale: torch.Tensor, out_features: int) -> None:
        if qdata.dtype != torch.int8 or qdata.dim() != 2 or not qdata.is_contiguous():
            raise ValueError("Int8Weight: qdata must be a contiguous int8 [in, out] tensor")
        if scale.dtype != torch.float32 or tuple(scale.shape) != (qdata.shape[1],):
            raise ValueError(f"Int8Weight: scale must be fp32 of shape [{qdata.shape[1]}], got {scale.dtype} {tuple(scale.shape)}")

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "Int8Weight":
        q, s = quantize_int8(weight)
        return cls(q, s, weight.dtype)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.qdata, self.scale, self.dtype)


class Int4Weight(QuantizedWeight):
    """An ``[out, in]`` weight stored as packed 4-bit codes ``qdata`` uint8 ``[in, ceil(out/2)]`` and
    fp32 ``scale [in, ceil(out/32)]`` (``quantize_int4``); ``out_features`` says the output count
    (an odd one leaves a spare nibble)."""

    FORMAT = "int4"

    @staticmethod
    def _out_features(qdata: torch.Tensor, out_features: int | None) -> int:
        return 2 * qdata.shape[1] if out_features is None else int(out_features)

    @staticmethod
    def _check(qdata: torch.Tensor, scale: torch.Tensor, out_features: int) -> None:
        if qdata.dtype != torch.uint8 or qdata.dim() != 2 or not qdata.is_contiguous():
            raise ValueError("Int4Weight: qdata must be contiguous uint8 [in, ceil(out/2)] packed codes")
        if qdata.shape[1] != (out_features + 1) // 2:
            raise ValueError(f"Int4Weight: {out_features} outputs take {(out_features + 1) // 2} bytes per row, qdata has {qdata.shape[1]}")
        groups = -(-out_features // INT4_GROUP_SIZE)
        if scale.dtype != torch.float32 or tuple(scale.shape) != (qdata.shape[0], groups):
            raise ValueError(f"Int4Weight: scale must be fp32 of shape [{qdata.shape[0]}, {groups}], got {scale.dtype} {tuple(scale.shape)}")

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "Int4Weight":
        q, s = quantize_int4(weight)
        return cls(q, s, weight.dtype, weight.shape[0])

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.qdata, self.scale, self.out_features, self.dtype)


WEIGHT_CLASSES: dict[str, type[QuantizedWeight]] = {"int8": Int8Weight, "int4": Int4Weight}


def weight_format(value: object) -> str | None:
    """``"int8"``/``"int4"`` for a quantized weight, None for anything else."""
    return value.FORMAT if isinstance(value, QuantizedWeight) else None


def is_int8_weight(value: object) -> bool:
    return isinstance(value, Int8Weight)


def is_int4_weight(value: object) -> bool:
    return isinstance(value, Int4Weight)


def from_torchao(weight: torch.Tensor) -> Int8Weight | None:
    """An ``Int8Weight`` with the codes and scales of a torchao int8 weight-only tensor, or None.

    Handles torchao's ``Int8Tensor`` (``qdata``, ``scale``) and ``AffineQuantizedTensor`` with a
    plain layout (``tensor_impl.int_data``/``scale``), symmetric per output channel (zero point 0).
    """
    cls_module = type(weight).__module__
    if not cls_module.startswith("torchao"):
        return None
    qdata = scale = zero = None
    if hasattr(weight, "qdata") and hasattr(weight, "scale"):
        qdata, scale = weight.qdata, weight.scale
        zero = getattr(weight, "zero_point", None)
    elif hasattr(weight, "tensor_impl"):
        impl = weight.tensor_impl
        qdata, scale, zero = getattr(impl, "int_data", None), getattr(impl, "scale", None), getattr(impl, "zero_point", None)
    if qdata is None or scale is None or qdata.dtype != torch.int8 or qdata.dim() != 2:
        return None
    scale = scale.reshape(-1).float()
    if scale.numel() != qdata.shape[0] or (zero is not None and bool((zero != 0).any())):
        return None  # not symmetric per output channel
    return Int8Weight(qdata.t().contiguous(), scale.contiguous(), weight.dtype)


