"""Shared by the command-line tests: a small text file to calibrate and evaluate on."""

import pytest

TEXT = (
    "Sparse activations let a decoder skip the weight rows of input channels that are nearly zero. "
    "The compiler rewrites every planned linear into a sparse op and leaves the rest to Inductor.\n\n\n"
    "A second document: calibration collects score histograms, and a search splits the budget across blocks. "
    "Evaluation reports perplexity, the divergence from the dense model and the achieved sparsity.\n"
)


@pytest.fixture
def text_file(tmp_path):
    """Two short documents in a plain-text file."""
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path
