"""``wisparse calibrate -> eval -> generate`` end to end on a tiny random model and a small text file."""

import json

from safetensors import safe_open

from wisparse_compile import SparsityPlan
from wisparse_compile.cli import main

TEXT = (
    "Sparse activations let a decoder skip the weight rows of input channels that are nearly zero. "
    "The compiler rewrites every planned linear into a sparse op and leaves the rest to Inductor.\n\n\n"
    "A second document: calibration collects score histograms, and a search splits the budget across blocks. "
    "Evaluation reports perplexity, the divergence from the dense model and the achieved sparsity.\n"
)


def test_calibrate_eval_generate(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
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


def test_eval_without_plan_and_bad_text(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    assert main(["eval", "random:llama", "--text", str(text), "--tokens", "64", "--length", "32"]) == 0
    out = capsys.readouterr().out
    assert "dense" in out and "sparse" not in out
    import pytest

    with pytest.raises(SystemExit, match="less than one --length"):
        main(["eval", "random:llama", "--text", str(text), "--tokens", "16", "--length", "32"])
    with pytest.raises(SystemExit, match="No such file|no such file|not found|Errno"):
        main(["calibrate", "random:llama", "-o", str(tmp_path / "p.safetensors"), "--text", str(tmp_path / "missing.txt")])
