"""The ``wisparse`` command line: one module per subcommand, listed in ``SUBCOMMANDS``.

A subcommand module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; adding one (``calibrate``, ``eval``, ``generate``) is a new module plus one
line here.
"""

from __future__ import annotations

import argparse
import logging
from types import ModuleType
from typing import Sequence

from . import calibrate, diff, evaluate, explain, generate

SUBCOMMANDS: tuple[ModuleType, ...] = (explain, diff, calibrate, evaluate, generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wisparse", description="wisparse-compile: activation-sparsity compiler tools")
    parser.add_argument(
        "--color", "--colour", choices=("auto", "always", "never"), default="auto",
        help="colour output: auto (a terminal, unless NO_COLOR is set), always or never",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log the compiler's decisions (INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_arguments(sub.add_parser(module.NAME, help=module.HELP, description=module.__doc__))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    command = next(m for m in SUBCOMMANDS if m.NAME == args.command)
    return command.run(args)
