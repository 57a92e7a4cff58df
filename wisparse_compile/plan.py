"""SparsityPlan: per-linear channel thresholds, with safetensors + JSON persistence."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from .files import atomic_write_bytes

FORMAT_VERSION = 1
_METADATA_KEY = "wisparse_plan"


class PlanError(ValueError):
    """A plan that cannot be used: corrupted file, wrong model, inconsistent contents."""


@dataclass
class SparsityPlan:
    """Which linears are sparse and how.

    channel_thresholds: linear name -> 1-D fp32 tensor t (len = in_features); channel i of the
        linear's input is kept for a token iff ``|x_i| > t_i``. For stacked expert weights the
        tensor is [num_experts, in_features].
    sparsities: linear name -> target sparsity used for its threshold.
    shapes: linear name -> weight shape as the model stores it (checked on attach).
    in_dims: linear name -> which weight dim indexes input channels (1 for nn.Linear's
        [out, in], 0 for [in, out] weights (addmm layouts), -1 for stacked experts [E, out, in]).
    model_class: class name of the calibrated model (checked on attach).
    method: "teal", "wina" or "wisparse".
    config: the SparsityConfig fields used (for the record).
    stats: free-form calibration facts (tokens seen, achieved calibration sparsity, ...).
    """

    channel_thresholds: dict[str, torch.Tensor]
    sparsities: dict[str, float]
    shapes: dict[str, list[int]]
    model_class: str
    method: str
    in_dims: dict[str, int] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = set(self.channel_thresholds)
        for name in names - set(self.in_dims):
            self.in_dims[name] = len(self.shapes.get(name, [0, 0])) - 1
        for other_name, other in (("sparsities", self.sparsities), ("shapes", self.shapes), ("in_dims", self.in_dims)):
            if set(other) != names:
                missing = sorted(names.symmetric_difference(other))[:3]
                raise PlanError(f"plan is inconsistent: {other_name} and channel_thresholds differ on {missing}")
        for name, t in self.channel_thresholds.items():
            if t.dim() not in (1, 2) or not t.is_floating_point():
                raise PlanError(f"plan entry {name!r}: thresholds must be a 1-D or 2-D float tensor")
            in_features = self.shapes[name][self.in_dims[name]]
            if t.shape[-1] != in_features:
                raise PlanError(f"plan entry {name!r}: {t.shape[-1]} thresholds for {in_features} input channels")

    @property
    def names(self) -> list[str]:
        return list(self.channel_thresholds)

    def mean_sparsity(self) -> float:
        """Parameter-weighted mean target sparsity over the planned linears."""
        sizes = {n: float(torch.Size(s).numel()) for n, s in self.shapes.items()}
        total = sum(sizes.values())
        return sum(self.sparsities[n] * sizes[n] for n in sizes) / total if total else 0.0

    def to(self, device: torch.device | str) -> "SparsityPlan":
        return SparsityPlan(
            {n: t.to(device) for n, t in self.channel_thresholds.items()},
            dict(self.sparsities), dict(self.shapes), self.model_class, self.method,
            dict(self.in_dims), dict(self.config), dict(self.stats),
        )

    # -- persistence -------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: a failed save leaves no partial file at ``path``."""
        meta = {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "names": self.names,
            "model_class": self.model_class,
            "sparsities": self.sparsities,
            "shapes": self.shapes,
            "in_dims": self.in_dims,
            "config": self.config,
            "stats": self.stats,
            "torch_version": torch.__version__,
        }
        tensors = {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in self.channel_thresholds.items()}
        atomic_write_bytes(path, safetensors_bytes(tensors, metadata={_METADATA_KEY: json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "SparsityPlan":
        """Read a plan file; PlanError names what is wrong with a file that is not a usable plan."""
        path = os.fspath(path)
        if os.path.isdir(path):
            raise PlanError(f"{path!r} is a directory; give the plan file (written by plan.save or `wisparse calibrate`)")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no plan file at {path!r}")
        remake = "re-create it with wsc.calibrate(...).save(path) or `wisparse calibrate`"
        try:
            with safe_open(path, framework="pt") as f:
                raw = (f.metadata() or {}).get(_METADATA_KEY)
                tensors = {name: f.get_tensor(name) for name in f.keys()} if raw is not None else {}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            size = os.path.getsize(path)
            raise PlanError(
                f"{path!r} ({size} bytes) is not a readable wisparse plan: not a safetensors file, or a "
                f"truncated or corrupted one ({e}); {remake}"
            ) from e
        if raw is None:
            raise PlanError(
                f"{path!r} is a safetensors file but not a wisparse plan (no {_METADATA_KEY!r} metadata): "
                f"model weights, perhaps? Give the plan file; {remake}"
            )
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as e:
            raise PlanError(f"{path!r}: plan metadata is corrupted ({e}); {remake}") from e
        if not isinstance(meta, dict):
            raise PlanError(f"{path!r}: plan metadata is not a JSON object; {remake}")
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            if isinstance(version, int) and version > FORMAT_VERSION:
                fix = "upgrade wisparse-compile to read it"
            else:
                fix = f"it predates this format; {remake}"
            raise PlanError(
                f"{path!r}: plan format version {version!r}, this wisparse-compile reads version {FORMAT_VERSION}: {fix}"
            )
        try:
            order = meta.get("names", sorted(tensors))
            if set(order) != set(tensors):
                raise PlanError("plan metadata and tensors name different linears")
            return cls(
                channel_thresholds={name: tensors[name] for name in order},
                sparsities={k: float(v) for k, v in meta["sparsities"].items()},
                shapes={k: list(v) for k, v in meta["shapes"].items()},
                model_class=meta["model_class"],
                method=meta["method"],
                in_dims={k: int(v) for k, v in meta.get("in_dims", {}).items()},
                config=meta.get("config", {}),
                stats=meta.get("stats", {}),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            if isinstance(e, PlanError):
                raise PlanError(f"{path!r}: {e}; {remake}") from e
            raise PlanError(f"{path!r}: plan metadata is malformed ({e!r}); {remake}") from e

    def __repr__(self) -> str:
        return (
            f"SparsityPlan(method={self.method!r}, model_class={self.model_class!r}, "
            f"linears={len(self.channel_thresholds)}, mean_sparsity={self.mean_sparsity():.3f})"
        )
