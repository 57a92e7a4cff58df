"""``wisparse eval`` (``cli/evaluate.py``): without a plan, the dense row only; the table's cells."""

from wisparse_compile.cli import main
from wisparse_compile.cli.evaluate import _row


def test_eval_without_plan(text_file, capsys):
    assert main(["eval", "random:llama", "--text", str(text_file), "--tokens", "64", "--length", "32"]) == 0
    out = capsys.readouterr().out
    assert "dense" in out and "sparse" not in out


def test_a_row_shows_missing_figures_as_a_dash():
    row = _row("dense", {"tokens": 124, "perplexity": 250.12345, "achieved_sparsity": 0.0}, 1.25)
    assert row.split() == ["dense", "124", "250.123", "-", "-", "0.000", "1.2"]
    full = _row("sparse", {"tokens": 124, "perplexity": 260.0, "kl_to_dense": 0.01234, "top1_agreement": 0.9,
                           "achieved_sparsity": None}, 2.0)
    assert full.split() == ["sparse", "124", "260.000", "0.0123", "0.900", "-", "2.0"]
