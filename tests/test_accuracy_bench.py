"""benchmarks/accuracy.py (its calibration windows, its dry run) and benchmarks/criterion_error.py (its dry run)."""

import argparse
import json

import pytest
import torch

from benchmarks.accuracy import calibration_windows


class _WordTokenizer:
    """One id per whitespace-separated word (the word's length), EOS = 0."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(w) for w in text.split()]}


def _args(mode, batches=3, length=4):
    return argparse.Namespace(calibration_windows=mode, calibration_batches=batches, calibration_length=length)


def test_spread_windows_take_the_start_of_each_long_enough_article():
    texts = ["a bb ccc dddd eeeee", "x y", "ab abc abcd abcde abcdef", "q qq qqq qqqq", "unused one two three"]
    windows = calibration_windows(_WordTokenizer(), texts, _args("spread"))
    assert [w.tolist() for w in windows] == [[[1, 2, 3, 4]], [[2, 3, 4, 5]], [[1, 2, 3, 4]]]  # the 2-word article skipped
    assert all(w.dtype == torch.long for w in windows)


def test_leading_windows_run_through_the_first_articles():
    windows = calibration_windows(_WordTokenizer(), ["a bb ccc dddd eeeee", "x yy"], _args("leading", batches=2))
    assert [w.tolist() for w in windows] == [[[1, 2, 3, 4]], [[5, 0, 1, 2]]]  # articles joined by EOS


def test_spread_windows_say_when_articles_run_out():
    with pytest.raises(ValueError, match="needs 3 articles"):
        calibration_windows(_WordTokenizer(), ["a b c d", "e f"], _args("spread"))


def test_accuracy_dry_run_writes_one_result_and_resumes_it(tmp_path):
    """``accuracy.py --dry-run``: dense and both methods on a tiny model, every domain, in the harness
    layout; a second run with the same setup measures nothing again."""
    from benchmarks import accuracy

    result = accuracy.main(["--dry-run", "--out-dir", str(tmp_path)])
    path = tmp_path / "accuracy" / "dry-run" / f"{result['date']}.json"
    data = json.loads(path.read_text())
    assert data["bench"] == "accuracy" and data["dry_run"] and data["records"] == result["records"]
    by_key = {r["key"]: r for r in data["records"]}
    assert list(by_key) == ["dense", "teal@0.5", "wisparse@0.5"]
    assert set(by_key["dense"]["perplexity"]) == {"wikipedia", "news", "newsgroups", "python-docs"}
    assert all(0.3 < by_key[k]["achieved_sparsity"] < 0.7 for k in ("teal@0.5", "wisparse@0.5"))
    assert "| 0.5 | wisparse rise / teal rise |" in path.with_suffix(".md").read_text()
    assert path.with_suffix(".png").is_file()
    again = accuracy.main(["--dry-run", "--out-dir", str(tmp_path)])
    assert again["records"] == result["records"]  # resumed: the same measurements, none redone


def test_criterion_error_dry_run(tmp_path):
    from benchmarks import criterion_error

    result = criterion_error.main(["--dry-run", "--out-dir", str(tmp_path)])
    path = tmp_path / "criterion_error" / "dry-run" / f"{result['date']}.json"
    data = json.loads(path.read_text())
    projections = [r for r in data["records"] if r["kind"] == "projection"]
    linears = [r for r in data["records"] if r["kind"] == "linear"]
    assert {r["rule"] for r in projections} == {"topk", "threshold"} and len(linears) == 2 * 14
    assert all(r["teal"] > 0 and r["wina"] > 0 for r in linears)
    assert "| topk | q_proj |" in path.with_suffix(".md").read_text()
