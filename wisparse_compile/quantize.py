"""8- and 4-bit weight-only quantization for sparse decode: the weight tensors, their config, and the model pass.

``QuantizeConfig`` (one dataclass) says what ``attach(model, plan, weights="int8"|"int4")`` quantizes:
the planned weights and, by default, the output head (``get_output_embeddings()``). Each becomes an
``Int8Weight``: a tensor subclass that looks like the ``[out, in]`` float weight it replaces
(same shape and dtype) but stores

- ``qdata``: int8 ``[in, out]``, contiguous (input-major), so a pruned input channel skips one
  contiguous int8 row, as the fp32 sparse kernel skips one fp32 row;
- ``scale``: fp32 ``[out]``, symmetric per output channel: ``W[o, i] ~= qdata[i, o] * scale[o]``,
  ``scale[o] = max_i |W[o, i]| / 127`` (a zero row gets scale 1, all-zero codes).

With ``weights="int4"`` each becomes an ``Int4Weight`` instead (``quantize_int4``):

- ``qdata``: uint8 ``[in, ceil(out/2)]``, contiguous (input-major): 4-bit codes in [-8, 7] (two's
  complement nibbles, no zero point), two per byte. Outputs go in blocks of 32 (the last block
  may be shorter, r outputs); within a block, with h = ceil(r/2) (16 for a full block), byte b
  holds output b in its low nibble and output b + h in its high nibble, so one 16-byte load of a
  full block unpacks into outputs 0-15 and 16-31 without rearranging lanes;
- ``scale``: fp32 ``[in, ceil(out/32)]``, grouped along the output dimension (so each input
  channel's row stays contiguous): ``scale[i, g] = max |W[o, i]| / d`` over the group's 32
  outputs, d the divisor in ``INT4_SCALE_DIVISORS`` (6 to 9) with the least squared error of the
  group (a zero group gets scale 1, zero codes), ``W[o, i] ~= code[i, o] * scale[i, o // 32]``.
  The kernel applies it per kept row and group (``x[i] * scale[i, g]``), not in an epilogue.

The compiler pass (``passes/rewrite_linears.py``) picks ``wisparse::sparse_linear_int8`` for any
linear whose weight is an ``Int8Weight`` (with the plan's thresholds if it has one, dense if not),
reading ``qdata`` and ``scale`` straight from the subclass (``wisparse::sparse_linear_int4`` for an
``Int4Weight``). Everything else that touches the weight
(an eager forward, ``masked_linears``, a linear the pass leaves dense) goes through
``__torch_dispatch__`` (one ``QuantizedWeight`` base serves both formats), which dequantizes:
eager calls compute with the same quantized values, never with raw codes, only slower.

A tied head (the output head's weight is the input embedding's) is untied for this: the head gets its own
quantized copy and the embedding keeps its float weight (an embedding lookup on an int8 weight
would dequantize the whole table per call); detach ties them again. The original float parameters
are kept (referenced, not copied) so ``detach`` restores them exactly; ``keep_float=False`` frees
them and ``detach`` then restores the dequantized values (and says so).

torchao's int8 weight-only tensors are converted on entry where its classes expose the int data and
per-channel scales (``from_torchao``): same codes, no re-quantization.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from .model_structure import find_weight

log = logging.getLogger(__name__)

WEIGHT_FORMATS = ("int8", "int4")
#: Outputs per int4 scale group (and per packed block: see the module docstring).
INT4_GROUP_SIZE = 32
#: Candidate int4 scales of a group, as ``max |W| / divisor``: the one with the least squared error
#: is kept (7: no clipping; larger: finer steps, the largest values clipped to -8/7). On SmolLM2
#: the search cut the relative weight error by about 11% against ``max |W| / 7`` alone.
INT4_SCALE_DIVISORS = tuple(d / 4 for d in range(24, 37))  # 6.0, 6.25, ..., 9.0


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """What ``attach(..., weights="int8"|"int4")`` quantizes.

    weights: the storage format of quantized weights (``"int8"``: symmetric, per output channel;
        ``"int4"``: 4-bit codes -8..7, one scale per input channel and ``group_size`` outputs).
    group_size: outputs per int4 scale group; 32, the only size the int4 kernels take (their
        packed block), so other values are refused rather than silently changed.
    head: also quantize the output head (``model.get_output_embeddings()``),
        which stays dense (not planned) but is the largest single GEMV of a small model's decode step.
    keep_float: keep the original float parameters (referenced, no copy) so ``detach`` restores them
        exactly; False frees them, and ``detach`` restores the dequantized values.
    """

    weights: str = "int8"
    head: bool = True
    keep_float: bool = True
    group_size: int = INT4_GROUP_SIZE

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"QuantizeConfig.weights must be one of {WEIGHT_FORMATS}, got {self.weights!r}")
        if self.group_size != INT4_GROUP_SIZE:
            raise ValueError(
                f"QuantizeConfig.group_size must be {INT4_GROUP_SIZE} (the int4 kernels' block of outputs), got {self.group_size}"
            )


def _checked_float(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """``weight`` as fp32 after the checks every format shares (2-D, floating point, finite)."""
    if weight.dim() != 2:
        raise ValueError(f"{fmt} quantization takes a 2-D [out, in] weight, got {weight.dim()}-D {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"{fmt} quantization takes a floating-point weight, got {weight.dtype}")
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError(f"{fmt} quantization: the weight holds NaN or Inf, which no {fmt} code represents")
    return w


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of an ``[out, in]`` weight: (qdata ``[in, out]`` int8, scale ``[out]`` fp32)."""
    w = _checked_float(weight, "int8")
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q.t().contiguous(), scale.contiguous()


def dequantize_int8(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``[out, in]`` weight (an input-major view) that ``qdata`` ``[in, out]`` and ``scale`` ``[out]`` stand for."""
    return (qdata.to(torch.float32) * scale).to(dtype).t()


def _block_positions(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output o: the byte of its packed row and whether it is the high nibble."""
    o = torch.arange(n, device=device)
    start = o // INT4_GROUP_SIZE * INT4_GROUP_SIZE
    h = (torch.clamp(n - start, max=INT4_GROUP_SIZE) + 1) // 2
    within = o - start
    high = within >= h
    return start // 2 + torch.where(high, within - h, within), high


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 4-bit codes of an ``[out, in]`` weight, grouped along the outputs (module docstring):
    (qdata uint8 ``[in, ceil(out/2)]``, scale fp32 ``[in, ceil(out/32)]``)."""
    w = _checked_float(weight, "int4").t()  # [in, out]
    k, n = w.shape
    groups = -(-n // INT4_GROUP_SIZE)
    padded = torch.zeros(k, groups * INT4_GROUP_SIZE, device=w.device)
    padded[:, :n] = w
    blocks = padded.reshape(k, groups, INT4_GROUP_SIZE)
    amax = blocks.abs().amax(dim=2, keepdim=True)
    nonzero = amax > 0
    amax = torch.where(nonzero, amax, torch.ones_like(amax))  # zero groups: any candidate; scale 1 below
    best_err = best_scale = None
    for divisor in INT4_SCALE_DIVISORS:  # the group's scale: the candidate with the least squared error
        candidate = amax / divisor
        err = ((torch.clamp(torch.round(blocks / candidate), -8, 7) * candidate - blocks) ** 2).sum(dim=2, keepdim=True)
        if best_err is None:
            best_err, best_scale = err, candidate
        else:
            better = err < best_err
            best_err, best_scale = torch.where(better, err, best_err), torch.where(better, candidate, best_scale)
    scale = torch.where(nonzero, best_scale, torch.ones_like(best_scale)).squeeze(2)
    codes = torch.clamp(torch.round(w / scale.repeat_interleave(INT4_GROUP_SIZE, dim=1)[:, :n]), -8, 7).to(torch.int32)
    byte, high = _block_positions(n, w.device)
    nibbles = (codes & 0xF) << (4 * high.to(torch.int32))
    packed = torch.zeros(k, (n + 1) // 2, dtype=torch.int32, device=w.device)
    packed.index_add_(1, byte, nibbles)  # the two nibbles of a byte never overlap
    return packed.to(torch.uint8).contiguous(), scale.contiguous()


def unpack_int4(qdata: torch.Tensor, out_features: int) -> torch.Tensor:
    """The int8 codes ``[in, out]`` that packed ``qdata`` ``[in, ceil(out/2)]`` holds (traceable: Inductor fuses it)."""
    v = qdata.to(torch.int16)
    low = ((v & 0xF) ^ 8) - 8
    high = ((v >> 4) ^ 8) - 8
    k, nb = qdata.shape
    n = out_features
    full, rest = divmod(n, INT4_GROUP_SIZE)
    half = INT4_GROUP_SIZE // 2
    parts = []
    if full:
        fb = full * half
        parts.append(torch.cat([low[:, :fb].reshape(k, full, half), high[:, :fb].reshape(k, full, half)], dim=2).reshape(k, full * INT4_GROUP_SIZE))
    if rest:
        h = (rest + 1) // 2
        parts.append(torch.cat([low[:, nb - h:], high[:, nb - h:]], dim=1)[:, :rest])
    return torch.cat(parts, dim=1).to(torch.int8) if len(parts) > 1 else parts[0].to(torch.int8)


def dequantize_int4(qdata: torch.Tensor, scale: torch.Tensor, out_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``[out, in]`` weight (an input-major view) that ``qdata`` and ``scale`` ``[in, ceil(out/32)]`` stand for."""
    codes = unpack_int4(qdata, out_features).to(torch.float32)
    return (codes * scale.repeat_interleave(INT4_GROUP_SIZE, dim=1)[:, :out_features]).to(dtype).t()


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
            return type(w)(func(w.qdata), func(w.scale), w.dtype, w.out_features)
        if func is aten._to_copy.default:
            w = args[0]
            device = kwargs.get("device") or w.device
            dtype = kwargs.get("dtype") or w.dtype
            if not dtype.is_floating_point:
                return func(w.dequantize(), **kwargs)
            return type(w)(w.qdata.to(device), w.scale.to(device), dtype, w.out_features)
        if func is aten.copy_.default and isinstance(args[0], QuantizedWeight):
            raise RuntimeError(
                f"in-place writes into a {args[0].FORMAT}-quantized weight are not supported: detach(model) first "
                "(it restores the float weights), change them, and attach again"
            )
        plain = tree_map_only(QuantizedWeight, lambda w: w.dequantize(), (args, kwargs))
        return func(*plain[0], **plain[1])


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


class _Quantized:
    """What quantize_model changed on one model, so dequantize_model can undo it."""

    def __init__(self) -> None:
        # (module, attribute name, original parameter or None, its name)
        self.swaps: list[tuple[nn.Module, str, nn.Parameter | None, str]] = []
        self.summary: dict[str, Any] = {}


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
) -> dict[str, Any]:
    """Replace the ``[out, in]`` weights named by ``names`` (plan keys: module or parameter names) and
    the head, if asked, with ``Int8Weight`` (``Int4Weight`` for ``config.weights="int4"``) parameters.

    Returns what it did: ``{"quantized": [names], "head": name or None, "untied": bool, "skipped":
    {name: why}, "format": config.weights}`` (also logged). Weights already in this format are kept,
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
    summary = {"quantized": done, "head": head if head in done else None, "untied": untied, "skipped": skipped,
               "format": config.weights}
    record.summary = summary
    log.info(
        "wisparse: %s weights for %d linears (%s head%s)%s", config.weights, len(done),
        "with the" if summary["head"] else "without a", " untied from the input embedding, which stays float" if untied else "",
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
                    record.summary.get("format", "quantized"))
    return restored


def quantization_of(model: nn.Module) -> dict[str, Any] | None:
    """What ``quantize_model`` did to ``model`` (its returned summary), or None if it is not quantized."""
    record = _QUANTIZED.get(model)
    return None if record is None else record.summary
