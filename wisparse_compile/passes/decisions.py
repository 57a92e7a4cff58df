"""What the passes decided for each linear: outcome, reason (an enum), weight layout and route, per graph.

Matches and emits nothing: the one report model. The rewrite and fusion passes fill it, the backend
keeps it (``CompileReport``, tensor-free so a long-lived process can keep many), the debug view
names its linears and renders it (``debug/report.py``), and it is written to and read from JSON
(``to_json``/``from_json``: the debug folders, ``wisparse explain``/``diff``).
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from ..kernels.routing import Layout, Route


class Outcome(str, enum.Enum):
    """What became of one linear (compares equal to its value: ``d.decision == "sparse"``)."""

    SPARSE = "sparse"  # a wisparse sparse op
    FUSED = "fused"  # sparse, and fused with its siblings (``fuse_siblings``)
    DENSE = "dense"  # left as it was; ``reason_kind`` says why


class DenseReason(str, enum.Enum):
    """Why a linear was left dense. The decision's ``reason`` adds the particulars."""

    NO_PLAN = "no plan entry"
    NOT_A_GRAPH_INPUT = "weight not a graph input"
    IN_DIM = "input dim differs from plan"
    SCALED_ADDMM = "scaled addmm"
    INPUT_DTYPE = "unsupported input dtype"
    DTYPE_MISMATCH = "dtype mismatch"
    AUTOCAST = "autocast"
    PREFILL = "prefill size"
    UNMATCHED_EXPERT_FORM = "unmatched expert form"
    SHARDING = "tensor-parallel sharding"


@dataclass
class LinearDecision:
    """What the passes did with one linear (or stacked expert contraction) node."""

    node: str
    form: str
    name: str | None  # plan key, if the weight is planned
    weight_shape: tuple[int, ...] | None
    dtype: str | None  # the weight's dtype (the activation's where the weight is no graph input)
    decision: Outcome = Outcome.DENSE
    reason: str = ""  # particulars for people (empty when sparse)
    reason_kind: DenseReason | None = None  # set exactly when the decision is DENSE
    route: Route = Route.DENSE  # the route the emitted op takes (``kernels.route_of``, at trace time)
    layout: Layout | None = None  # the weight's layout when it became a wisparse op (quantized ones even without a plan)
    weight_input: int | None = None  # index of the weight's graph input (debug reports name it)
    planned_sparsity: float | None = None  # the target sparsity the weight's plan gives it
    module: str | None = None  # the name reports show: the plan key, else the weight's path (``debug.report``)

    def leave_dense(self, kind: DenseReason, reason: str = "") -> "LinearDecision":
        self.decision, self.reason_kind, self.reason, self.route = Outcome.DENSE, kind, reason or kind.value, Route.DENSE
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: enums as their values, the shape as a list."""
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, enum.Enum):
                data[key] = value.value
        data["weight_shape"] = list(self.weight_shape) if self.weight_shape is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LinearDecision":
        fields = dict(data)
        fields["decision"] = Outcome(fields["decision"])
        fields["route"] = Route(fields["route"])
        for key, kind in (("reason_kind", DenseReason), ("layout", Layout)):
            fields[key] = kind(fields[key]) if fields.get(key) is not None else None
        fields["weight_shape"] = tuple(fields["weight_shape"]) if fields.get("weight_shape") is not None else None
        return cls(**fields)


@dataclass
class CompileReport:
    """The decisions of one compiled graph. Holds no tensors: the backend keeps recent ones."""

    decisions: list[LinearDecision] = field(default_factory=list)
    rank: int | None = None  # this process's rank in a multi-process (tensor-parallel) run, else None
    graph: str = ""  # the graph's label in debug output (set when the debug view names the decisions)

    @property
    def rewritten(self) -> int:
        """Linears that became wisparse sparse ops, fused ones included."""
        return sum(d.decision in (Outcome.SPARSE, Outcome.FUSED) for d in self.decisions)

    @property
    def counts(self) -> dict[str, int]:
        """found = rewritten + dense; fused counts the rewritten linears that run with their siblings."""
        outcomes = [d.decision for d in self.decisions]
        return {
            "found": len(outcomes),
            "rewritten": self.rewritten,
            "fused": outcomes.count(Outcome.FUSED),
            "dense": outcomes.count(Outcome.DENSE),
        }

    def to_json(self) -> str:
        return json.dumps(
            {"graph": self.graph, "rank": self.rank, "counts": self.counts, "linears": [d.to_dict() for d in self.decisions]},
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> "CompileReport":
        data = json.loads(text)
        return cls([LinearDecision.from_dict(d) for d in data["linears"]], data.get("rank"), data.get("graph", ""))

    def summary(self) -> str:
        dense = [d for d in self.decisions if d.decision == Outcome.DENSE]
        reasons: dict[str, int] = {}
        for d in dense:
            reasons[d.reason] = reasons.get(d.reason, 0) + 1
        why = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
        where = f"rank {self.rank}: " if self.rank is not None else ""
        return f"{where}{len(self.decisions)} linears: {self.rewritten} sparse, {len(dense)} dense" + (f" ({why})" if why else "")


@dataclass
class RewriteResult:
    """The report of the rewrite, and what the backend needs to feed the inputs it appended.

    threshold_sources: for each appended threshold input, the index of the weight input whose
        thresholds it carries (the backend looks them up per call, by the weight actually passed).
    threshold_examples: those thresholds at compile time (example inputs for Inductor only).
    unplanned_weight_inputs: input indices of weights of linears left dense for want of a plan
        (watched at run time, in case a plan is attached after compiling).
    """

    report: CompileReport = field(default_factory=CompileReport)
    threshold_sources: list[int] = field(default_factory=list)
    threshold_examples: list[torch.Tensor] = field(default_factory=list)
    unplanned_weight_inputs: list[int] = field(default_factory=list)

