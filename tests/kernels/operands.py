"""Operands for kernel tests: a sparse linear's (x, W, b, t) and sibling linears' for the fused GEMV."""

from __future__ import annotations

import torch

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def linear_operands(m, n, k, sparsity, dtype, input_major=True, seed=0):
    """x [m, k], W [n, k] (input-major strides unless told), b [n], per-channel t [k] pruning
    about ``sparsity`` of the scores ``|x| * norms``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    norms = torch.rand(k, generator=g) + 0.5
    scores = x.abs().float() * norms
    if sparsity >= 1.0:
        t = torch.full((k,), float("inf"))
    elif sparsity == 0.0:
        t = torch.zeros(k)
    else:
        t = torch.quantile(scores.flatten(), sparsity) / norms
    if input_major:
        w = w.t().contiguous().t()
    return x, w, b, t


def sibling_operands(m, splits, k, dtype, sparsity=0.5, seed=0, bias=True):
    """x and, per sibling of ``splits[i]`` outputs, an input-major weight, a bias (none for sibling 1)
    and weight-aware thresholds (so each sibling prunes differently)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    ws, bs, ts = [], [], []
    for i, n in enumerate(splits):
        w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
        norms = w.float().norm(dim=0)
        t = torch.quantile((x.abs().float() * norms).flatten(), sparsity) / norms
        ws.append(w.t().contiguous().t())
        bs.append(torch.randn(n, generator=g).to(dtype) if bias and i != 1 else None)
        ts.append(t)
    return x, ws, bs, ts


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """``out`` (in ``dtype``) equals the fp32 reference up to the dtype's rounding, NaN/Inf included."""
    assert out.dtype == dtype and out.shape == ref.shape, (out.dtype, out.shape, ref.shape)
    out = out.float()
    ref_rounded = ref.to(dtype).float()
    assert torch.equal(out.isnan(), ref_rounded.isnan()), "NaN positions differ"
    assert torch.equal(out.isinf() & (out > 0), ref_rounded.isinf() & (ref_rounded > 0)), "+Inf positions differ"
    assert torch.equal(out.isinf() & (out < 0), ref_rounded.isinf() & (ref_rounded < 0)), "-Inf positions differ"
    finite = ref_rounded.isfinite()
    scale = max(1.0, ref[finite].abs().max().item()) if finite.any() else 1.0
    err = (out[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0
    assert err <= TOLERANCE[dtype] * scale, err
