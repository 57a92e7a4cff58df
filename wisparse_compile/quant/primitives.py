"""The format math of 8- and 4-bit weight-only quantization: codes, scales, packing, dequantization.

int8 (``quantize_int8``): ``qdata`` int8 ``[in, out]``, contiguous (input-major, so a pruned input
channel skips one contiguous int8 row, as the fp32 sparse kernel skips one fp32 row); ``scale``
fp32 ``[out]``, symmetric per output channel: ``W[o, i] ~= qdata[i, o] * scale[o]``,
``scale[o] = max_i |W[o, i]| / 127`` (a zero row gets scale 1, all-zero codes).

int4 (``quantize_int4``): ``qdata`` uint8 ``[in, ceil(out/2)]``, contiguous (input-major): 4-bit
codes in [-8, 7] (two's complement nibbles, no zero point), two per byte. Outputs go in blocks of
32 (the last block may be shorter, r outputs); within a block, with h = ceil(r/2) (16 for a full
block), byte b holds output b in its low nibble and output b + h in its high nibble, so one 16-byte
load of a full block unpacks into outputs 0-15 and 16-31 without rearranging lanes. ``scale`` fp32
``[in, ceil(out/32)]``, grouped along the output dimension (so each input channel's row stays
contiguous): ``scale[i, g] = max |W[o, i]| / d`` over the group's 32 outputs, d the divisor in
``INT4_SCALE_DIVISORS`` (6 to 9) with the least squared error of the group (a zero group gets
scale 1, zero codes), ``W[o, i] ~= code[i, o] * scale[i, o // 32]``. The kernel applies it per kept
row and group (``x[i] * scale[i, g]``), not in an epilogue.

A leaf: plain torch, imports nothing from the package (the kernels' references import it).
"""

from __future__ import annotations

import torch

WEIGHT_FORMATS = ("int8", "int4")
#: Outputs per int4 scale group (and per packed block: see the module docstring).
INT4_GROUP_SIZE = 32
#: Candidate int4 scales of a group, as ``max |W| / divisor``: the one with the least squared error
#: is kept (7: no clipping; larger: finer steps, the largest values clipped to -8/7). On SmolLM2
#: the search cut the relative weight error by about 11% against ``max |W| / 7`` alone.
INT4_SCALE_DIVISORS = tuple(d / 4 for d in range(24, 37))  # 6.0, 6.25, ..., 9.0


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


