"""``wisparse explain MODEL``: compile on sample input, print every linear's decision and the counts.

No benchmark: this answers "what did the compiler do to my model, and why", in seconds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ..debug.report import format_table
from .session import add_model_arguments, attach_plan, compile_into, load_model
from .style import BOLD, paint, use_colour

NAME = "explain"
HELP = "compile a model on sample input and print what happened to each linear"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    colour = use_colour(sys.stdout, args.color)
    model = load_model(args.model)
    attach_plan(model, args)
    with tempfile.TemporaryDirectory(prefix="wisparse-explain-") as tmp:
        graphs = compile_into(model, args, Path(args.debug_dir or tmp))
    if not graphs:
        print("no graph reached the wisparse backend (was the model compiled at all?)", file=sys.stderr)
        return 1
    totals = dict.fromkeys(("found", "rewritten", "fused", "dense"), 0)
    for g in graphs:
        print(format_table(g.report, colour=colour))
        print()
        for key, n in g.report.counts.items():
            totals[key] += n
    summary = (
        f"{len(graphs)} graph(s): {totals['found']} linears found, {totals['rewritten']} rewritten, "
        f"{totals['fused']} fused, {totals['dense']} left dense"
    )
    print(paint(summary, BOLD, colour))
    if args.debug_dir:
        print(f"debug files: {args.debug_dir}")
    return 0
