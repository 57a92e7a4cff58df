"""Output sensitivity of each block: diagonal Fisher weights on its output, so that errors count in loss.

A block's plain reconstruction error ``||dh||^2`` says nothing about how much that error moves the
model's next-token distribution, and the errors of different blocks are on different scales (the
residual stream grows with depth). Weighting each squared output error by the squared gradient of
the next-token loss with respect to that output (the diagonal of the empirical Fisher information,
per token and channel) turns it into a second-order estimate of the loss increase: the within-block
split then minimises what the model's output feels, and every block's error is in the same unit, so
budgets can be traded across blocks at one exchange rate (``search.lagrangian_budgets``), with no
search that could fit its validation tokens.

One backward pass per refinement batch; parameters get no gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..model_io import call_model
from .blocks import BlockCalls, Layout, first_tensor

log = logging.getLogger(__name__)


def _labels(batch: Any, device: torch.device) -> torch.Tensor:
    """Next-token targets [batch, seq - 1] of a batch, -100 where the attention mask is 0."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
    if not isinstance(ids, torch.Tensor):
        raise TypeError("output sensitivities need input_ids to take next-token targets from")
    ids = (ids.unsqueeze(0) if ids.dim() == 1 else ids).to(device)
    labels = ids[:, 1:].clone()
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if isinstance(mask, torch.Tensor):
        labels[mask.to(device).reshape(ids.shape)[:, 1:] == 0] = -100
    return labels


def _logits(output: Any) -> torch.Tensor:
    """The model output's logits (``.logits``, else its first tensor)."""
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else first_tensor(output)


def _draw(flat_logits: torch.Tensor, seed: int, samples: int) -> torch.Tensor:
    """[positions, samples] next tokens drawn from the logits' distribution (seeded)."""
    generator = torch.Generator(device=flat_logits.device).manual_seed(seed)
    return torch.multinomial(flat_logits.detach().float().softmax(-1), samples, replacement=samples > 1, generator=generator)


def sample_next_tokens(model: nn.Module, batches: Sequence[Any], device: torch.device, seed: int = 0,
                       samples: int = 1) -> list[torch.Tensor]:
    """Per batch, [positions, samples] next tokens drawn from the model's distribution as it runs now,
    as ``output_sensitivities`` draws them (same seed, same tokens)."""
    out = []
    with torch.no_grad():
        for batch in batches:
            logits = _logits(call_model(model, batch, device))
            out.append(_draw(logits[:, :-1].float().reshape(-1, logits.shape[-1]), seed, samples))
    return out


def output_sensitivities(
    model: nn.Module, layout: Layout, calls: Mapping[str, BlockCalls], batches: Sequence[Any], device: torch.device,
    sampled: bool = True, seed: int = 0, samples: int = 1, drawn: Sequence[torch.Tensor] | None = None,
) -> dict[str, list[torch.Tensor]] | None:
    """Per block, per captured call: the squared gradient of the summed next-token loss with respect to
    the block's output, shaped like that output (aligned with ``calls[prefix].outputs``).

    sampled: the loss is on next tokens drawn from the model's own distribution (``seed`` per batch):
    the squared gradients then estimate the Fisher information, whose quadratic form is the KL
    divergence to the dense model; False: on the data's next tokens (the empirical Fisher).
    samples: with ``sampled``, the squared gradients are averaged over this many draws per token
    (one backward each), a less noisy Fisher estimate.
    drawn: with ``sampled``, the next tokens to use, per batch [positions, samples] (``sample_next_tokens``
    of another model state, e.g. the dense model's while this one runs masked) instead of drawing them
    from this forward's distribution.
    The gradient starts at the input of the first block called (a leaf that requires grad), so any
    model with decoder blocks works. None (with a warning) when the model's output is not next-token
    logits over the batch's ids, or a block is not called once per forward: the caller then falls back
    to plain output errors."""
    grads: dict[str, list[torch.Tensor]] = {b.prefix: [] for b in layout.blocks}
    outputs: dict[str, list[torch.Tensor]] = {b.prefix: [] for b in layout.blocks}

    def start_gradient(module, args, kwargs):
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point() and not args[0].requires_grad:
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        hidden = kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor) and hidden.is_floating_point() and not hidden.requires_grad:
            return args, {**kwargs, "hidden_states": hidden.detach().requires_grad_(True)}
        return None

    def keep_output(prefix: str):
        def hook(module, args, output):
            hidden = first_tensor(output)
            if hidden.requires_grad:
                hidden.retain_grad()
            outputs[prefix].append(hidden)
        return hook

    handles = [b.module.register_forward_pre_hook(start_gradient, with_kwargs=True) for b in layout.blocks]
    handles += [b.module.register_forward_hook(keep_output(b.prefix)) for b in layout.blocks]
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for index, batch in enumerate(tqdm(batches, desc="output sensitivities", unit="batch", leave=False)):
                for held in outputs.values():
                    held.clear()
                logits = _logits(call_model(model, batch, device))
                labels = _labels(batch, device)
                if (logits.dim() != 3 or logits.shape[:2] != (labels.shape[0], labels.shape[1] + 1)
                        or int(labels.max()) >= logits.shape[-1]):
                    log.warning("%s returns %s, not next-token logits [batch, seq, vocab] over the batch's ids: "
                                "within-block splits use plain output errors", type(model).__name__, tuple(logits.shape))
                    return None
                flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
                targets = [labels.reshape(-1)]
                if sampled:  # the model's own next tokens: the Fisher whose quadratic form is KL to dense
                    tokens = drawn[index].to(flat.device) if drawn is not None else _draw(flat, seed, samples)
                    targets = [torch.where(targets[0] == -100, targets[0], tokens[:, k]) for k in range(tokens.shape[1])]
                squares: dict[str, torch.Tensor] = {}
                for k, target in enumerate(targets):
                    loss = F.cross_entropy(flat, target, ignore_index=-100, reduction="sum")
                    loss.backward(retain_graph=k < len(targets) - 1)
                    for prefix, held in outputs.items():
                        if len(held) != 1 or held[0].grad is None:
                            log.warning("block %s was called %d times in one forward (or got no gradient): "
                                        "within-block splits use plain output errors", prefix, len(held))
                            return None
                        square = held[0].grad.detach().float().pow(2) / len(targets)
                        squares[prefix] = square if k == 0 else squares[prefix] + square
                        held[0].grad = None
                for prefix, square in squares.items():
                    grads[prefix].append(square)
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
    for b in layout.blocks:
        if len(grads[b.prefix]) != len(calls[b.prefix].outputs):
            log.warning("block %s: %d gradients for %d captured calls; within-block splits use plain output errors",
                        b.prefix, len(grads[b.prefix]), len(calls[b.prefix].outputs))
            return None
    return grads
