"""benchmarks/accuracy.py: which calibration windows it takes."""

import argparse

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
