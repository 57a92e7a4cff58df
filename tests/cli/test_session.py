"""What the subcommands share (``cli/session.py``): loading a model, sample input, text windows and
debug folders, each bad input a message naming the problem."""

import argparse

import pytest
import torch
from torch import nn

from wisparse_compile.cli import main
from wisparse_compile.cli.session import CompiledGraph, read_graphs, sample_ids, vocab_size
from wisparse_compile.debug.dump import REPORT_JSON
from wisparse_compile.passes.decisions import CompileReport


def test_bad_model_names_the_fix():
    with pytest.raises(SystemExit, match="neither a model folder"):
        main(["explain", "/nonexistent/model"])


def test_bad_text_names_the_problem(tmp_path, text_file):
    with pytest.raises(SystemExit, match="less than one --length"):
        main(["eval", "random:llama", "--text", str(text_file), "--tokens", "16", "--length", "32"])
    with pytest.raises(SystemExit, match="No such file|no such file|not found|Errno"):
        main(["calibrate", "random:llama", "-o", str(tmp_path / "p.safetensors"), "--text", str(tmp_path / "missing.txt")])


def test_sample_ids_are_seeded_tokens_of_the_models_vocabulary():
    model = nn.Linear(2, 2)
    model.config = argparse.Namespace(vocab_size=5)
    ids = sample_ids(model, 2, 7, seed=3)
    assert ids.shape == (2, 7) and ids.dtype == torch.int64 and 0 <= int(ids.min()) and int(ids.max()) < 5
    assert torch.equal(ids, sample_ids(model, 2, 7, seed=3)) and not torch.equal(ids, sample_ids(model, 2, 7, seed=4))
    with pytest.raises(SystemExit, match="config has no vocab_size, cannot make sample tokens"):
        vocab_size(nn.Linear(2, 2))


def test_read_graphs_lists_the_report_folders_in_compile_order(tmp_path):
    for folder, graph in (("1_0", "b"), ("0_0", "a"), ("notes", None)):
        (tmp_path / folder).mkdir()
        if graph is not None:
            (tmp_path / folder / REPORT_JSON).write_text(CompileReport(graph=graph).to_json())
    graphs = read_graphs(tmp_path)
    assert graphs == [CompiledGraph(tmp_path / "0_0", CompileReport(graph="a")),
                      CompiledGraph(tmp_path / "1_0", CompileReport(graph="b"))]
