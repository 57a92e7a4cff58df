"""The ``wisparse`` command line end to end on a tiny random model: ``explain -> diff`` on its debug
folder, and ``calibrate -> eval -> generate`` on a small text file."""

import json

import pytest
from safetensors import safe_open

from wisparse_compile import SparsityPlan
from wisparse_compile.cli import main


def test_explain_then_diff(tmp_path, capsys):
    debug = tmp_path / "debug"
    assert main(["explain", "random:llama", "--sparsity", "0.5", "--tokens", "4", "--debug-dir", str(debug)]) == 0
    out = capsys.readouterr().out
    assert "\033[" not in out  # captured output is not a terminal: plain text
    assert "model.layers.1.mlp.down_proj" in out and "lm_head" in out and "no plan entry" in out
    assert "1 graph(s): 15 linears found, 14 rewritten, 0 fused, 1 left dense" in out

    assert main(["diff", str(debug)]) == 0
    diff = capsys.readouterr().out
    assert diff.startswith("---") and diff.count("+        sparse_linear_default") == 14
    assert "\033[" not in diff

    assert main(["--color", "always", "diff", str(debug), "--graph", "0"]) == 0
    assert "\033[32m+" in capsys.readouterr().out

    with pytest.raises(SystemExit, match="no graph '7'"):
        main(["diff", str(debug), "--graph", "7"])


def test_calibrate_eval_generate(tmp_path, capsys, text_file):
    text = text_file
    plan_path = tmp_path / "plan.safetensors"
    assert main(["calibrate", "random:llama", "-o", str(plan_path), "--text", str(text), "--tokens", "320",
                 "--length", "32", "--sparsity", "0.5", "--method", "wisparse", "--validation-tokens", "32",
                 "--population", "3", "--generations", "1", "--across-blocks", "free"]) == 0
    assert "wisparse plan at sparsity 0.5: 14 linears" in capsys.readouterr().out
    plan = SparsityPlan.load(plan_path)
    assert plan.method == "wisparse" and len(plan.names) == 14 and "search" in plan.stats["allocation"]
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []  # atomic: no leftovers
    with safe_open(str(plan_path), "pt") as f:
        assert len(f.keys()) == 14

    report_path = tmp_path / "eval.json"
    assert main(["eval", "random:llama", "--plan", str(plan_path), "--text", str(text), "--tokens", "128",
                 "--length", "32", "--json", str(report_path)]) == 0
    table = capsys.readouterr().out
    assert "perplexity" in table and table.count("\n") >= 3
    report = json.loads(report_path.read_text())
    dense, sparse = report["results"]["dense"], report["results"]["sparse"]
    assert dense["tokens"] == sparse["tokens"] == 4 * 31
    assert sparse["kl_to_dense"] > 0 and 0 < sparse["top1_agreement"] <= 1
    assert 0.3 < sparse["achieved_sparsity"] < 0.7  # on unseen text, near the 0.5 target
    assert sparse["perplexity"] != dense["perplexity"]

    assert main(["generate", "random:llama", "--plan", str(plan_path), "--prompt", "hello", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "dense (" in out and "sparse wisparse (" in out and "tok/s" in out
    assert "compiled for sparse decoding" in out and "14 sparse" in out
