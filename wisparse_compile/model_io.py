"""Running a model on calibration or evaluation batches: one way to call it, shared by every pass.

A batch is a dict of tensors (``input_ids``, ``attention_mask``, ...) or an ``input_ids`` tensor
([seq] or [batch, seq]). Calibration, the allocation's passes and the masked reference all call
the model through ``call_model`` so they see the same forward; decoding loops pass their KV cache
under ``cache_keyword(model)``.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter that holds data (CPU when none does).

    Parameters on the meta device are placeholders of weights that accelerate's offloading hooks
    load per forward (on their execution device, moving the inputs there too): they are skipped."""
    for p in model.parameters():
        if not p.is_meta:
            return p.device
    return torch.device("cpu")


def batch_tokens(batch: Any) -> int:
    """Token count of a batch (input_ids tensor, or a dict holding one); 0 when unknown."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0


def model_call_kwargs(model: nn.Module) -> dict[str, Any]:
    """``use_cache=False`` where the model takes it: calibration passes must not build a KV cache."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def cache_keyword(model: nn.Module) -> str:
    """The keyword under which ``model.forward`` takes its KV cache: ``cache`` or ``past_key_values``.

    transformers renamed ``past_key_values`` to ``cache`` model by model (the decoder forwards take
    ``cache`` in 5.24 and warn, through ``deprecate_kwarg``, that the old name goes in 5.40; 5.17
    knows only ``past_key_values``). The version alone does not tell which name a given model's
    forward has (remote-code and not yet renamed models keep the old one), so the forward's
    signature decides (``inspect.signature`` follows the decorators' ``__wrapped__`` to the
    declared parameters). ``past_key_values`` wherever the forward names it, names neither or
    cannot be inspected: every version still accepts it. Decide once per model, not per step.
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def call_model(model: nn.Module, batch: Any, device: torch.device) -> Any:
    """Run one batch (dict of tensors or input_ids) on ``device`` and return the model's output."""
    extra = model_call_kwargs(model)
    if isinstance(batch, Mapping):
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return model(**{**extra, **inputs})
    if isinstance(batch, torch.Tensor):
        ids = batch.to(device)
        return model(ids.unsqueeze(0) if ids.dim() == 1 else ids, **extra)
    raise TypeError(f"a calibration batch must be a dict of tensors or an input_ids tensor, got {type(batch).__name__}")


def run_batch(model: nn.Module, batch: Any, device: torch.device) -> int:
    """Call the model on one batch; return its token count."""
    call_model(model, batch, device)
    return batch_tokens(batch)
