"""The linear table of one compiled graph: every linear the pass found, named, and what it became.

Built from the passes' ``CompileReport`` plus the graph and example inputs the backend saw, so the
pass itself stays free of reporting code. Planned linears are named by their plan key; the rest by
their weight placeholder's Dynamo source, turned into a dotted ``named_parameters`` path.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import fx

from ..attach import planned_sparsity
from ..model_structure import linear_name
from ..kernels.routing import Route
from ..passes.decisions import CompileReport, Outcome

_INDEX = re.compile(r"\[(?:'([^']*)'|\"([^\"]*)\"|(\d+))\]")


def dotted_source_name(source: str) -> str:
    """``L['self']._modules['model']._parameters['weight']`` -> ``model.weight``.

    Dynamo spells parameter sources as a Python expression rooted at the frame's locals; dropping
    the root and the ``_modules``/``_parameters`` containers gives the ``named_parameters`` name
    (relative to the frame after a graph break). The root may be indexed: where transformers (5.24+)
    wraps ``forward``, the module is ``L['args'][0]``.
    """
    text = re.sub(r"^(?:L|G)\[['\"][^'\"]+['\"]\](?:\[\d+\])*\.?", "", source)
    text = _INDEX.sub(lambda m: "." + next(g for g in m.groups() if g is not None), text)
    parts = [p for p in text.split(".") if p and p not in ("_modules", "_parameters", "_buffers")]
    return ".".join(parts)


def placeholder_source(node: fx.Node) -> str | None:
    """The Dynamo source name of a placeholder, from ``grapharg`` (while compiling) or the node."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None) or getattr(node, "_dynamo_source", None)
    if source is None:
        return None
    name = source.name
    return name() if callable(name) else str(name)


def _module_path_from_meta(node: fx.Node | None) -> str | None:
    stack = node.meta.get("nn_module_stack") if node is not None else None
    if not stack:
        return None
    path, _ = list(stack.values())[-1]
    return dotted_source_name(str(path))


@dataclass
class LinearRow:
    """One linear of a compiled graph, as the debug report shows it."""

    module: str
    node: str
    form: str
    weight_shape: list[int] | None
    dtype: str | None
    planned_sparsity: float | None
    outcome: str  # an ``Outcome``: "sparse", "fused" or "dense"
    reason: str = ""
    reason_kind: str = ""  # a ``DenseReason`` when dense, else ""
    route: str = ""  # a ``Route``: how the op runs ("" in reports written before routes were recorded)
    layout: str = ""  # a ``Layout`` when the linear became a wisparse op, else ""


@dataclass
class GraphReport:
    """The linear table and counts of one compiled graph."""

    graph: str
    rows: list[LinearRow] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        outcomes = [r.outcome for r in self.rows]
        return {
            "found": len(outcomes),
            "rewritten": outcomes.count(Outcome.SPARSE),
            "fused": outcomes.count(Outcome.FUSED),
            "dense": outcomes.count(Outcome.DENSE),
        }

    def to_json(self) -> str:
        return json.dumps({"graph": self.graph, "counts": self.counts, "linears": [asdict(r) for r in self.rows]}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "GraphReport":
        data = json.loads(text)
        return cls(data["graph"], [LinearRow(**row) for row in data["linears"]])


def build_report(
    graph: str, before: fx.GraphModule, example_inputs: Sequence[Any], result: CompileReport
) -> GraphReport:
    """Name every decision of ``result``; ``before`` is the graph as Dynamo gave it."""
    placeholders = [n for n in before.graph.nodes if n.op == "placeholder"]
    nodes = {n.name: n for n in before.graph.nodes}
    report = GraphReport(graph)
    for d in result.decisions:
        weight = example_inputs[d.weight_input] if d.weight_input is not None else None
        module = d.name
        if module is None and d.weight_input is not None and d.weight_input < len(placeholders):
            source = placeholder_source(placeholders[d.weight_input])
            module = linear_name(dotted_source_name(source)) if source else None
        module = module or _module_path_from_meta(nodes.get(d.node)) or d.node
        report.rows.append(
            LinearRow(
                module=module,
                node=d.node,
                form=d.form,
                weight_shape=list(d.weight_shape) if d.weight_shape is not None else None,
                dtype=str(weight.dtype).removeprefix("torch.") if isinstance(weight, torch.Tensor) else d.dtype,
                planned_sparsity=planned_sparsity(weight) if weight is not None else None,
                outcome=Outcome(d.decision).value,
                reason=d.reason,
                reason_kind=d.reason_kind.value if d.reason_kind is not None else "",
                route=d.route.value,
                layout=d.layout.value if d.layout is not None else "",
            )
        )
    return report


def format_table(report: GraphReport, colour: bool = False) -> str:
    """Readable fixed-width table of ``report`` (ANSI colours when ``colour``)."""
    header = ("module", "shape", "dtype", "planned", "became", "route", "why dense")
    lines = [
        (
            r.module,
            "x".join(map(str, r.weight_shape)) if r.weight_shape else "?",
            r.dtype or "?",
            f"{r.planned_sparsity:.2f}" if r.planned_sparsity is not None else "-",
            "sparse_linear" if r.outcome == Outcome.SPARSE else r.outcome,
            (f"{r.layout} {r.route}" if r.layout else r.route) if r.route != Route.DENSE else "",
            f"{r.reason_kind}: {r.reason}" if r.reason_kind and r.reason_kind != r.reason else r.reason,
        )
        for r in report.rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = [f"graph {report.graph}", "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    for row, line in zip(report.rows, lines):
        text = "  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
        if colour:
            code = "32" if row.outcome == Outcome.SPARSE else "36" if row.outcome == Outcome.FUSED else "33"
            text = f"\033[{code}m{text}\033[0m"
        out.append(text)
    c = report.counts
    out.append(f"{c['found']} linears found: {c['rewritten']} rewritten, {c['fused']} fused, {c['dense']} left dense")
    return "\n".join(out)
