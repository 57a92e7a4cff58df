"""The ``wisparse`` command line end to end on a tiny random model."""

import io

import pytest

from wisparse_compile.cli import build_parser, main
from wisparse_compile.cli.style import use_colour


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


def test_bad_model_names_the_fix():
    with pytest.raises(SystemExit, match="neither a model folder"):
        main(["explain", "/nonexistent/model"])


def test_colour_follows_tty_and_no_color(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_colour(Tty()) and not use_colour(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_colour(Tty()) and use_colour(io.StringIO(), "always")


def test_subcommands_are_registered():
    parser = build_parser()
    for command in ("explain", "diff"):
        args = parser.parse_args([command, "random:llama", "--plan", "p.safetensors"])
        assert args.command == command and args.plan == "p.safetensors"
