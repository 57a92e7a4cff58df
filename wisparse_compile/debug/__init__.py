"""Graph-diff debugging: what the wisparse pass changed in each compiled graph, and why."""

from .dump import DEBUG_DIR_ENV, debug_dir, record_graph, unified_diff
from .report import GraphReport, LinearRow, build_report, dotted_source_name, format_table, reason_kind

__all__ = [
    "DEBUG_DIR_ENV",
    "GraphReport",
    "LinearRow",
    "build_report",
    "debug_dir",
    "dotted_source_name",
    "format_table",
    "reason_kind",
    "record_graph",
    "unified_diff",
]
