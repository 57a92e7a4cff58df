"""``wisparse diff SOURCE``: the unified diff the pass made to one compiled graph.

SOURCE is a debug directory (from ``WISPARSE_DEBUG_DIR``, the ``debug_dir`` option or
``explain --debug-dir``), or a model as ``explain`` takes it, compiled on the spot.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ..debug.dump import DIFF
from .session import CompiledGraph, add_model_arguments, attach_plan, compile_into, load_model, read_graphs
from .style import colour_diff, use_colour

NAME = "diff"
HELP = "print the graph diff of one compiled graph (from a debug dir, or compiling a model)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--graph", default=None,
        help="which graph: its number in compile order (0, 1, ...) or its folder/compile id; "
        "default: the first graph the pass changed",
    )


def pick_graph(graphs: list[CompiledGraph], which: str | None) -> CompiledGraph:
    if which is None:
        changed = [g for g in graphs if g.report.counts["rewritten"] or g.report.counts["fused"]]
        return (changed or graphs)[0]
    if which.isdigit() and int(which) < len(graphs):
        return graphs[int(which)]
    for g in graphs:
        if g.folder.name == which or g.folder.name.endswith("_" + which.replace("/", "_")):
            return g
    names = ", ".join(g.folder.name for g in graphs)
    raise SystemExit(f"wisparse diff: no graph {which!r}; the graphs are: {names}")


def _print(graphs: list[CompiledGraph], args: argparse.Namespace) -> int:
    if not graphs:
        print(f"wisparse diff: no graph reports found in {args.model}", file=sys.stderr)
        return 1
    g = pick_graph(graphs, args.graph)
    diff = (g.folder / DIFF).read_text()
    if not diff:
        print(f"graph {g.report.graph}: the pass changed nothing ({g.report.counts['found']} linears, none rewritten)")
        return 0
    sys.stdout.write(colour_diff(diff, use_colour(sys.stdout, args.color)))
    return 0


def run(args: argparse.Namespace) -> int:
    source = Path(args.model)
    if source.is_dir() and any(True for _ in source.glob(f"*/{DIFF}")):
        return _print(read_graphs(source), args)
    model = load_model(args.model)
    attach_plan(model, args)
    with tempfile.TemporaryDirectory(prefix="wisparse-diff-") as tmp:
        return _print(compile_into(model, args, Path(args.debug_dir or tmp)), args)
