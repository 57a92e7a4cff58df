"""Show the pass's work: per compiled graph, the code before and after, their diff, the linear table.

Three outlets, all fed by ``record_graph`` (called by the backend for every graph it compiles):
- a debug directory (``BackendConfig.debug_dir`` or ``WISPARSE_DEBUG_DIR``): one folder per graph
  with ``before.py``, ``after.py``, ``diff.patch``, ``linears.json`` and ``linears.txt`` (in a
  ``rank<N>`` subfolder per process of a multi-process, e.g. tensor-parallel, run);
- ``torch._logging.trace_structured`` artifacts (``TORCH_TRACE=dir``, then ``tlparse``);
- the module logger: ``TORCH_LOGS="+wisparse_compile"`` prints the linear table at DEBUG.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from functools import cache
from typing import Callable

from torch import fx

from ..passes.decisions import CompileReport
from .report import format_table, name_decisions

log = logging.getLogger(__name__)

DEBUG_DIR_ENV = "WISPARSE_DEBUG_DIR"
BEFORE, AFTER, DIFF, REPORT_JSON, REPORT_TEXT = "before.py", "after.py", "diff.patch", "linears.json", "linears.txt"


def debug_dir(option: str | None) -> Path | None:
    """The directory to write to: the backend option, else the env var, else None."""
    value = option or os.environ.get(DEBUG_DIR_ENV)
    return Path(value) if value else None


def graph_code(gm: fx.GraphModule) -> str:
    """Readable Python of a graph module (with shapes and source lines, as ``print_readable``)."""
    try:
        return gm.print_readable(print_output=False)
    except Exception as e:  # some graphs carry meta print_readable cannot show; the code always works
        log.debug("print_readable failed (%s); using gm.code", e)
        return gm.code


def unified_diff(before: str, after: str, name: str = "graph") -> str:
    """Unified diff of two graph listings; empty when the pass changed nothing."""
    return "".join(
        difflib.unified_diff(
            before.splitlines(keepends=True), after.splitlines(keepends=True),
            fromfile=f"{name}/{BEFORE}", tofile=f"{name}/{AFTER}",
        )
    )


def _graph_id() -> str:
    """Dynamo's compile id of the graph being compiled (``0_0``), or ``graph`` outside Dynamo."""
    try:
        from torch._guards import CompileContext

        compile_id = CompileContext.current_compile_id()
    except Exception:
        compile_id = None
    return str(compile_id).replace("/", "_").strip("[]") if compile_id is not None else "graph"


def _new_graph_dir(root: Path, graph: str) -> Path:
    """A fresh ``NNN_<compile id>`` folder under ``root`` (numbered in compile order)."""
    root.mkdir(parents=True, exist_ok=True)
    index = len([p for p in root.iterdir() if p.is_dir()])
    while True:
        path = root / f"{index:03d}_{graph}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            index += 1


def _trace_artifact(name: str, encoding: str, payload_fn: Callable[[], str]) -> None:
    """A tlparse-visible artifact; ``payload_fn`` runs only when ``TORCH_TRACE`` is on."""
    from torch._logging import trace_structured

    trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": name, "encoding": encoding},
        payload_fn=payload_fn,
    )


def record_graph(
    before: fx.GraphModule,
    after: fx.GraphModule,
    result: CompileReport,
    directory: str | None = None,
) -> CompileReport | None:
    """Emit the before/after code, diff and linear table of one graph to every enabled outlet.

    Never fails the compile: a debugging aid that breaks compilation would hide the real problem.
    """
    root = debug_dir(directory)
    if root is not None and result.rank is not None:
        root = root / f"rank{result.rank}"  # each rank of a multi-process run writes its own folders
    want_log = log.isEnabledFor(logging.DEBUG)
    try:
        graph = _graph_id()
        label = graph if result.rank is None else f"{graph}@rank{result.rank}"
        report = name_decisions(result, label, before)
        # printing a large graph takes a while: only when some outlet wants it
        before_code, after_code = cache(lambda: graph_code(before)), cache(lambda: graph_code(after))
        _trace_artifact("wisparse_graph_before", "string", before_code)
        _trace_artifact("wisparse_graph_after", "string", after_code)
        _trace_artifact("wisparse_linears", "json", report.to_json)
        if want_log:
            log.debug("graph %s linears:\n%s", graph, format_table(report))
        if root is not None:
            folder = _new_graph_dir(root, graph)
            for name, text in (
                (BEFORE, before_code()), (AFTER, after_code()),
                (DIFF, unified_diff(before_code(), after_code(), graph)),
                (REPORT_JSON, report.to_json()), (REPORT_TEXT, format_table(report) + "\n"),
            ):
                (folder / name).write_text(text)
            log.info("wisparse: graph %s debug files in %s", graph, folder)
        return report
    except Exception as e:
        log.warning("wisparse: could not write the debug report of a graph: %s", e, exc_info=want_log)
        return None
