"""The debug view of a compile report: every linear the pass found, named, as a table.

Renders the passes' ``CompileReport`` (the one report model, ``passes/decisions.py``), after naming
its decisions from the graph the backend saw, so the pass itself stays free of reporting code.
Planned linears are named by their plan key; the rest by their weight placeholder's Dynamo source,
turned into a dotted ``named_parameters`` path.
"""

from __future__ import annotations

import re

from torch import fx

from ..model_structure import linear_name
from ..kernels.routing import Route
from ..passes.decisions import CompileReport, LinearDecision, Outcome

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


def name_decisions(report: CompileReport, graph: str, before: fx.GraphModule) -> CompileReport:
    """Name every decision of ``report`` for display (``module``) and label it ``graph``; ``before`` is the
    graph as Dynamo gave it. Returns ``report`` (changed in place: the backend keeps the named one)."""
    placeholders = [n for n in before.graph.nodes if n.op == "placeholder"]
    nodes = {n.name: n for n in before.graph.nodes}
    report.graph = graph
    for d in report.decisions:
        module = d.name
        if module is None and d.weight_input is not None and d.weight_input < len(placeholders):
            source = placeholder_source(placeholders[d.weight_input])
            module = linear_name(dotted_source_name(source)) if source else None
        d.module = module or _module_path_from_meta(nodes.get(d.node)) or d.node
    return report


def _route_cell(d: LinearDecision) -> str:
    if d.route == Route.DENSE:
        return ""
    return f"{d.layout.value} {d.route.value}" if d.layout is not None else d.route.value


def format_table(report: CompileReport, colour: bool = False) -> str:
    """Readable fixed-width table of ``report`` (ANSI colours when ``colour``): the debug view of the report model."""
    header = ("module", "shape", "dtype", "planned", "became", "route", "why dense")
    lines = [
        (
            d.module or d.name or d.node,
            "x".join(map(str, d.weight_shape)) if d.weight_shape else "?",
            d.dtype or "?",
            f"{d.planned_sparsity:.2f}" if d.planned_sparsity is not None else "-",
            "sparse_linear" if d.decision == Outcome.SPARSE else d.decision.value,
            _route_cell(d),
            f"{d.reason_kind.value}: {d.reason}" if d.reason_kind and d.reason_kind.value != d.reason else d.reason,
        )
        for d in report.decisions
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = [f"graph {report.graph}", "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    for d, line in zip(report.decisions, lines):
        text = "  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
        if colour:
            code = "32" if d.decision == Outcome.SPARSE else "36" if d.decision == Outcome.FUSED else "33"
            text = f"\033[{code}m{text}\033[0m"
        out.append(text)
    c = report.counts
    out.append(f"{c['found']} linears found: {c['rewritten']} rewritten, {c['fused']} fused, {c['dense']} left dense"
               + (" (fused ones count as rewritten)" if c["fused"] else ""))
    return "\n".join(out)
