"""``benchmarks/compare_revisions.py``: reading the quickstart's table, and the whole run on a tiny stand-in."""

import json
from pathlib import Path

import pytest

from benchmarks import compare_revisions
from benchmarks.harness import RESULT_KEYS

ROOT = Path(__file__).resolve().parents[1]

QUICKSTART_OUTPUT = """wisparse_compile imported from {tree}/wisparse_compile/__init__.py
Loading SmolLM2-135M and the Wikipedia articles ...

SmolLM2-135M, teal plan at 50% (achieved on held-out text: 49.8%), calibrated in 21 s
                             dense    sparse    ratio
perplexity (held-out)        11.76     16.42    1.40x
decode tokens/s               17.5      36.2    2.07x
next-token agreement with dense on held-out text: 81.3%; greedy decode: 20 of 64 tokens identical to dense
dense decode:  ' the city'
sparse decode: ' the town'
"""


def test_parse_quickstart_reads_every_figure(tmp_path):
    figures = compare_revisions.parse_quickstart(QUICKSTART_OUTPUT.format(tree=tmp_path), tmp_path)
    assert figures["dense_perplexity"] == 11.76 and figures["sparse_perplexity"] == 16.42
    assert figures["dense_tokens_per_s"] == 17.5 and figures["speedup"] == pytest.approx(36.2 / 17.5)
    assert figures["achieved_sparsity"] == pytest.approx(0.498) and figures["top1_agreement"] == pytest.approx(0.813)
    assert (figures["greedy_tokens_identical"], figures["greedy_tokens"]) == (20, 64)
    assert figures["sparse_decode"] == "' the town'"


def test_parse_quickstart_refuses_a_run_of_the_other_tree_and_a_missing_line(tmp_path):
    with pytest.raises(RuntimeError, match="imported wisparse_compile from"):
        compare_revisions.parse_quickstart(QUICKSTART_OUTPUT.format(tree="/elsewhere"), tmp_path)
    broken = QUICKSTART_OUTPUT.format(tree=tmp_path).replace("decode tokens/s", "tokens")
    with pytest.raises(RuntimeError, match="lacks \\['tokens_per_s'\\]"):
        compare_revisions.parse_quickstart(broken, tmp_path)


def test_compare_flags_a_quality_change_and_ratios_speedups():
    base = compare_revisions.parse_quickstart(QUICKSTART_OUTPUT.format(tree=ROOT), ROOT)
    head = {**base, "sparse_perplexity": 16.5, "speedup": base["speedup"] * 1.1}
    record = compare_revisions.compare({"base": [base, base], "head": [head]})
    assert record["same_quality"] is False and record["speedup_ratio"] == pytest.approx(1.1)
    assert compare_revisions.compare({"base": [base], "head": [base]})["same_quality"] is True


@pytest.mark.slow
def test_dry_run_compares_head_with_this_checkout(tmp_path):
    result = compare_revisions.main(["--dry-run", "--out-dir", str(tmp_path)])
    data = json.loads(Path(result["path"]).read_text())
    assert set(RESULT_KEYS) == data.keys() and data["dry_run"] is True and data["bench"] == "compare_revisions"
    [record] = data["records"]
    assert record["method"] == "teal" and len(record["base"]["runs"]) == len(record["head"]["runs"]) == 1
    assert record["base"]["dense_perplexity"] > 1 and record["head"]["speedup"] > 0
    assert "| teal | head/base |" in Path(result["path"]).with_suffix(".md").read_text()
