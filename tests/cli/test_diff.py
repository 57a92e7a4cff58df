"""``wisparse diff`` (``cli/diff.py``): which graph it shows, and a debug folder without reports."""

import re
from pathlib import Path

import pytest

from wisparse_compile.cli import main
from wisparse_compile.cli.diff import pick_graph
from wisparse_compile.cli.session import CompiledGraph
from wisparse_compile.passes.decisions import CompileReport, LinearDecision, Outcome


def _graph(folder: str, rewritten: bool) -> CompiledGraph:
    decision = LinearDecision("linear", "linear", "l", (2, 2), "float32",
                              decision=Outcome.SPARSE if rewritten else Outcome.DENSE)
    return CompiledGraph(Path("debug") / folder, CompileReport([decision]))


GRAPHS = [_graph("000_0_0", False), _graph("001_1_0", True), _graph("002_2_0", True)]


def test_default_is_the_first_graph_the_pass_changed():
    assert pick_graph(GRAPHS, None) is GRAPHS[1]
    assert pick_graph(GRAPHS[:1], None) is GRAPHS[0]  # none changed: the first


def test_a_graph_by_number_folder_or_compile_id():
    assert pick_graph(GRAPHS, "2") is GRAPHS[2]
    assert pick_graph(GRAPHS, "001_1_0") is GRAPHS[1]
    assert pick_graph(GRAPHS, "2/0") is GRAPHS[2]  # a compile id, as torch prints it
    with pytest.raises(SystemExit, match="no graph '9'; the graphs are: 000_0_0, 001_1_0, 002_2_0"):
        pick_graph(GRAPHS, "9")


def test_a_folder_without_graph_reports_is_loaded_as_a_model(tmp_path):
    """Not a debug folder: taken as a model folder, and this one is none (the loader says why)."""
    with pytest.raises(SystemExit, match="^wisparse: .*" + re.escape(str(tmp_path))):
        main(["diff", str(tmp_path)])
