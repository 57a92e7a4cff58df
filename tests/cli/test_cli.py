"""The ``wisparse`` command (``cli/__init__.py``): one parser with a subcommand per module, and its options.
(Each subcommand: its own test file; flows across several: test_cli_workflow.py.)"""

import logging

import pytest

from wisparse_compile.cli import SUBCOMMANDS, build_parser, main


def test_subcommands_are_registered():
    parser = build_parser()
    for command in ("explain", "diff"):
        args = parser.parse_args([command, "random:llama", "--plan", "p.safetensors"])
        assert args.command == command and args.plan == "p.safetensors"


def test_every_subcommand_module_has_the_subcommand_interface():
    assert [m.NAME for m in SUBCOMMANDS] == ["explain", "diff", "calibrate", "eval", "generate"]
    for module in SUBCOMMANDS:
        assert module.HELP and module.__doc__ and callable(module.add_arguments) and callable(module.run)


def test_global_options_and_a_missing_command(capsys):
    args = build_parser().parse_args(["--colour", "never", "-v", "explain", "random:llama"])
    assert (args.color, args.verbose, args.tokens, args.batch, args.decode) == ("never", True, 8, 1, False)
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([])
    assert exit_info.value.code == 2 and "COMMAND" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--color", "sometimes", "explain", "m"])


def test_main_runs_the_chosen_subcommand(monkeypatch):
    from wisparse_compile.cli import explain

    seen = []
    monkeypatch.setattr(explain, "run", lambda args: seen.append(args) or 7)
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: seen.append(kwargs))
    assert main(["-v", "explain", "random:llama"]) == 7
    assert seen[0]["level"] == logging.INFO and seen[1].command == "explain" and seen[1].model == "random:llama"
