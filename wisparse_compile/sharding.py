"""Tensor-parallel weights: the threshold slice each rank's shard needs, read from the sharding itself.

A model loaded with ``from_pretrained(..., tp_plan="auto")`` keeps each sharded weight as a
``DTensor`` parameter: its global shape (what the plan was calibrated on), its ``device_mesh`` and
``placements`` (``Shard(0)`` for a column-parallel linear, ``Shard(1)`` = ``Shard(-1)`` for a
row-parallel one, ``_StridedShard`` for packed gate/up stacks), and the local shard this rank
computes with. The engine runs each linear on the local shard (``weight.to_local()`` inside the
module's forward, then its own collectives), so the sparse op sees local tensors and needs the
thresholds of the local shard's input channels:

- a dim of the weight that holds no input channels (a column-parallel output dim) may be split in
  any way: every input channel is local, the thresholds are all of them;
- the input-channel dim (and the expert dim of stacked ``[E, ...]`` expert weights, whose
  thresholds are ``[E, in]``) must be split in contiguous blocks (``Shard``): the slice is
  ``[offset, offset + local size)``, the offsets DTensor itself gives the shard.

Anything else (a ``Partial`` weight, a strided or interleaved split of the input channels, a local
shard whose shape is not the one its placements give) raises ``ShardingError`` naming the weight,
the placement and why: ``attach`` then leaves that linear dense with the reason in the compile
report, never with wrong thresholds. No model code: only the DTensor metadata is read.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


class ShardingError(ValueError):
    """A sharded weight whose placement gives no contiguous slice of its thresholds."""


def _dtensor_class() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(value: Any) -> bool:
    """Whether ``value`` is a DTensor (a tensor-parallel shard with its global metadata)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(value, cls)


def local_tensor(value: Any) -> Any:
    """The local shard of a DTensor (the tensor this rank computes with); anything else as it is.

    ``_local_tensor`` itself, not ``to_local()``: on torch 2.13 a parameter's ``to_local()`` is a
    fresh view per call, and re-laying a weight must change the tensor every later view reads.
    """
    return value._local_tensor if is_dtensor(value) else value


def threshold_dims(weight_dims: int, in_dim: int) -> dict[int, int]:
    """Weight dim -> thresholds dim: ``[in]`` for a 2-D weight, ``[E, in]`` for stacked experts."""
    return {in_dim: 0} if weight_dims == 2 else {0: 0, in_dim: 1}


def describe(weight: torch.Tensor) -> str:
    """``Shard(dim=1) on mesh (tp=2), local [64, 64] of [64, 128]``, for logs and reports."""
    placements = ", ".join(repr(p) for p in weight.placements)
    mesh = weight.device_mesh
    names = getattr(mesh, "mesh_dim_names", None) or tuple(f"dim{i}" for i in range(mesh.ndim))
    mesh_text = ", ".join(f"{n}={s}" for n, s in zip(names, mesh.shape))
    return f"{placements} on mesh ({mesh_text}), local {list(local_tensor(weight).shape)} of {list(weight.shape)}"


def local_thresholds(name: str, weight: torch.Tensor, thresholds: torch.Tensor, in_dim: int) -> torch.Tensor:
    """The thresholds of the input channels (and experts) of this rank's shard of ``weight``.

    ``weight`` as a plain tensor: ``thresholds`` unchanged. A DTensor: see the module docstring;
    raises ``ShardingError`` for a placement with no contiguous slice.
    """
    if not is_dtensor(weight):
        return thresholds
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    ndim = weight.dim()
    dims = threshold_dims(ndim, in_dim)
    kept = []  # the placements that split a thresholds dim; the others count as replicated here
    for placement in weight.placements:
        if isinstance(placement, Partial):
            raise ShardingError(
                f"{name}: its weight is {describe(weight)}, a Partial (pending-reduction) placement: the local "
                "shard is no slice of the weight; load the model with a tp_plan that shards weights (colwise/rowwise)"
            )
        split_dim = getattr(placement, "dim", None)  # any sharding (``_StridedShard`` is no ``Shard``)
        if isinstance(placement, Replicate) or (isinstance(split_dim, int) and split_dim % ndim not in dims):
            kept.append(Replicate())
            continue
        if type(placement) is not Shard or not isinstance(split_dim, int):
            what = (
                "placement is of a kind wisparse does not know" if not isinstance(split_dim, int)
                else f"{'input-channel' if split_dim % ndim == in_dim else 'expert'} dim is not split in contiguous blocks"
            )
            raise ShardingError(
                f"{name}: its weight is {describe(weight)}: the {what} ({placement!r}), so no slice of the plan's "
                "thresholds fits its shard; use a tp_plan that splits that dim with a plain Shard (rowwise), "
                "or leave the linear unsharded"
            )
        kept.append(Shard(split_dim % ndim))
    if all(isinstance(p, Replicate) for p in kept):
        return thresholds  # every input channel (and expert) is local
    shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, kept)
    local = local_tensor(weight)
    if len(offset) != ndim:
        raise ShardingError(f"{name}: this rank is not part of the weight's device mesh ({describe(weight)})")
    for wdim, tdim in dims.items():
        if shape[wdim] != local.shape[wdim]:
            raise ShardingError(
                f"{name}: its weight is {describe(weight)}, but its placements give this rank {shape[wdim]} of dim "
                f"{wdim}, not the {local.shape[wdim]} it holds: an uneven layout the thresholds cannot follow"
            )
        thresholds = thresholds.narrow(tdim, offset[wdim], shape[wdim])
    return thresholds.contiguous()


def tensor_parallel_size(model: torch.nn.Module) -> int:
    """The tensor-parallel degree transformers recorded on ``model`` (1 when not sharded)."""
    size = getattr(model, "_tp_size", None) or getattr(model, "tp_size", None)
    return int(size) if isinstance(size, int) else 1


def process_rank() -> int | None:
    """This process's rank in the default process group, or None outside a multi-process run."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    return torch.distributed.get_rank() if torch.distributed.get_world_size() > 1 else None
