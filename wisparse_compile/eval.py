"""Quality of a sparse model: perplexity, and agreement with the dense model's next-token distribution.

Works with any callable model (eager, ``torch.compile``d, or eager under ``masked_linears``), on
CPU or GPU; windows are non-overlapping and scored independently.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Callable, ContextManager, Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class QualityReport:
    """perplexity of the model; kl (nats/token) and top1 agreement vs dense, when compared."""

    tokens: int
    perplexity: float
    kl_to_dense: float | None = None
    top1_agreement: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _logits(model: Callable, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def evaluate(
    model: Callable,
    windows: Iterable[torch.Tensor],
    dense: Callable | None = None,
    context: Callable[[], ContextManager] = contextlib.nullcontext,
    device: str | torch.device = "cpu",
    desc: str = "evaluating",
) -> QualityReport:
    """Perplexity of ``model`` over ``windows``; with ``dense``, also KL(dense || model) and top-1 agreement.

    context: a factory of a context manager entered around each sparse call (e.g. ``masked_linears``).
    """
    windows = list(windows)
    nll, tokens, kl, agree = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for ids in tqdm(windows, desc=desc, unit="win", leave=False):
            ids = ids.to(device)
            with context():
                logits = _logits(model, ids)[0, :-1]
            targets = ids[0, 1:]
            nll += F.cross_entropy(logits, targets, reduction="sum").item()
            tokens += targets.numel()
            if dense is not None:
                ref = _logits(dense, ids)[0, :-1]
                logp, logq = F.log_softmax(ref, -1), F.log_softmax(logits, -1)
                kl += (logp.exp() * (logp - logq)).sum().item()
                agree += (ref.argmax(-1) == logits.argmax(-1)).sum().item()
    if tokens == 0:
        raise ValueError("no tokens to evaluate")
    return QualityReport(
        tokens=tokens,
        perplexity=math.exp(nll / tokens),
        kl_to_dense=kl / tokens if dense is not None else None,
        top1_agreement=agree / tokens if dense is not None else None,
    )


def overall_sparsity(per_linear: dict[str, float], shapes: dict[str, list[int]]) -> float:
    """Parameter-weighted mean of per-linear sparsities: the budget a plan's target refers to."""
    sizes = {n: math.prod(shapes[n]) for n in per_linear}
    total = sum(sizes.values())
    if total == 0:
        raise ValueError("no planned linear was called: nothing to average")
    return sum(per_linear[n] * sizes[n] for n in per_linear) / total
