"""``wisparse calibrate`` (``cli/calibrate.py``): its options, and bad ones refused before a model loads."""

import pytest

from wisparse_compile.cli import build_parser, main
from wisparse_compile.cli import calibrate as calibrate_command


def test_options_and_their_defaults():
    args = build_parser().parse_args(["calibrate", "random:llama", "-o", "plan.wsp"])
    assert (args.output, args.sparsity, args.method, args.uniform, args.across_blocks) == ("plan.wsp", 0.5, "wisparse", False, None)
    assert (args.tokens, args.length, args.text, args.seed) == (8192, 512, "wikipedia", 0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["calibrate", "random:llama"])  # -o is required


@pytest.mark.parametrize("argv, problem", [
    (["--population", "3"], "--validation-tokens, --population and --generations set the search of --across-blocks free"),
    (["--uniform", "--generations", "1", "--across-blocks", "free"], "set the search of --across-blocks free"),
    (["--sparsity", "1.5"], "wisparse: sparsity must be a number in \\[0, 1\\)"),
    (["--refinement-tokens", "0"], "wisparse: refinement_tokens must be positive"),
])
def test_bad_options_exit_with_the_reason_before_loading_a_model(monkeypatch, argv, problem):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(calibrate_command, "load_model", no_model)
    with pytest.raises(SystemExit, match=problem):
        main(["calibrate", "random:llama", "-o", "plan.wsp", *argv])
