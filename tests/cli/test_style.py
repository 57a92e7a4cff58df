"""Terminal colour (``cli/style.py``): on for a terminal unless NO_COLOR, and what it paints."""

import io

from wisparse_compile.cli.style import BOLD, CYAN, GREEN, RED, RESET, colour_diff, paint, use_colour


def test_colour_follows_tty_and_no_color(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_colour(Tty()) and not use_colour(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_colour(Tty()) and use_colour(io.StringIO(), "always")


def test_always_and_never_win_over_the_stream_and_the_environment(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    assert use_colour(io.StringIO(), "always") and not use_colour(io.StringIO(), "never")
    monkeypatch.delenv("NO_COLOR")
    assert not use_colour(object())  # a stream without isatty is no terminal


def test_paint_wraps_text_only_when_colouring():
    assert paint("x", BOLD, True) == BOLD + "x" + RESET
    assert paint("x", BOLD, False) == "x" and paint("", BOLD, True) == ""


def test_diff_lines_are_coloured_by_kind_and_keep_their_line_ends():
    diff = "--- before\n+++ after\n@@ -1 +1 @@\n-old\n+new\n same\n+last"
    assert colour_diff(diff, False) is diff
    assert colour_diff(diff, True).split("\n") == [
        BOLD + "--- before" + RESET, BOLD + "+++ after" + RESET, CYAN + "@@ -1 +1 @@" + RESET,
        RED + "-old" + RESET, GREEN + "+new" + RESET, " same", GREEN + "+last" + RESET,
    ]
