"""Terminal colour: on for a terminal, off when piped or when ``NO_COLOR`` is set (no-color.org)."""

from __future__ import annotations

import os
from typing import TextIO

RESET = "\033[0m"
RED, GREEN, YELLOW, CYAN, BOLD = "\033[31m", "\033[32m", "\033[33m", "\033[36m", "\033[1m"


def use_colour(stream: TextIO, choice: str = "auto") -> bool:
    """``always``/``never`` win; ``auto`` colours a tty unless ``NO_COLOR`` is set."""
    if choice != "auto":
        return choice == "always"
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def paint(text: str, code: str, colour: bool) -> str:
    return f"{code}{text}{RESET}" if colour and text else text


def colour_diff(diff: str, colour: bool) -> str:
    """A unified diff with removed lines red, added green, hunk headers cyan."""
    if not colour:
        return diff
    out = []
    for line in diff.splitlines(keepends=True):
        body, end = line.rstrip("\n"), line[len(line.rstrip("\n")):]
        if line.startswith(("+++", "---")):
            out.append(paint(body, BOLD, True) + end)
        elif line.startswith("@@"):
            out.append(paint(body, CYAN, True) + end)
        elif line.startswith("+"):
            out.append(paint(body, GREEN, True) + end)
        elif line.startswith("-"):
            out.append(paint(body, RED, True) + end)
        else:
            out.append(line)
    return "".join(out)
