"""Test helpers independent of the package's own masking code."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread inside: tiny shapes run ~20x faster than with threads contending on a
    shared machine, and sums run in one order (what a file written under it needs to match)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``ids``, without autograd."""
    with torch.no_grad():
        return model(ids).logits


def sqnr_db(reference: torch.Tensor, actual: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio in dB (as torchao reports it)."""
    reference, actual = reference.double(), actual.double()
    noise = (reference - actual).norm()
    return float("inf") if noise == 0 else float(20 * torch.log10(reference.norm() / noise))


class MaskingHooks:
    """Eager reference: forward pre-hooks on the modules owning planned weights (nn.Linear, or any
    module whose forward takes the activation first, e.g. Conv1D) mask |x_i| <= t_i to zero."""

    def __init__(self, model: nn.Module, thresholds: dict[str, torch.Tensor]) -> None:
        self.handles = []
        modules = dict(model.named_modules())
        for name, t in thresholds.items():
            module = modules[name]
            assert isinstance(getattr(module, "weight", None), nn.Parameter), name
            self.handles.append(module.register_forward_pre_hook(self._hook(t)))

    @staticmethod
    def _hook(t: torch.Tensor):
        def hook(module, args):
            x, *rest = args
            return (x * (x.abs().float() > t.to(x.device).float()).to(x.dtype), *rest)

        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
