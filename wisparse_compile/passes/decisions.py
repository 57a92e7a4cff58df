"""What the passes decided for each linear: outcome, reason (an enum), weight layout and route, per graph.

Matches and emits nothing: the records the rewrite and fusion passes fill, that the backend keeps
(``CompileReport``, tensor-free so a long-lived process can keep many) and the debug report shows.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

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
    dtype: str | None
    decision: Outcome = Outcome.DENSE
    reason: str = ""  # particulars for people (empty when sparse)
    reason_kind: DenseReason | None = None  # set exactly when the decision is DENSE
    route: Route = Route.DENSE  # the route the emitted op takes (``kernels.route_of``, at trace time)
    layout: Layout | None = None  # the weight's layout when it became a wisparse op (quantized ones even without a plan)
    weight_input: int | None = None  # index of the weight's graph input (debug reports name it)

    def leave_dense(self, kind: DenseReason, reason: str = "") -> "LinearDecision":
        self.decision, self.reason_kind, self.reason, self.route = Outcome.DENSE, kind, reason or kind.value, Route.DENSE
        return self


@dataclass
class CompileReport:
    """The decisions of one compiled graph. Holds no tensors: the backend keeps recent ones."""

    decisions: list[LinearDecision] = field(default_factory=list)
    rank: int | None = None  # this process's rank in a multi-process (tensor-parallel) run, else None

    @property
    def rewritten(self) -> int:
        return sum(d.decision in (Outcome.SPARSE, Outcome.FUSED) for d in self.decisions)

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

