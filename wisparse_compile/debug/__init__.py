"""Graph-diff debugging: what the wisparse pass changed in each compiled graph, and why."""

from .dump import DEBUG_DIR_ENV, debug_dir, record_graph, unified_diff
from .history import CompileHistory
from .report import dotted_source_name, format_table, name_decisions

__all__ = [
    "CompileHistory",
    "DEBUG_DIR_ENV",
    "debug_dir",
    "dotted_source_name",
    "format_table",
    "name_decisions",
    "record_graph",
    "unified_diff",
]
