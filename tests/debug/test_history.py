"""The bounded history of compile reports (``debug/history.py``): indices are compile numbers, old ones drop."""

import threading

import pytest

from wisparse_compile.debug.history import KEPT_REPORTS, CompileHistory
from wisparse_compile.passes.decisions import CompileReport


def _reports(n: int) -> list[CompileReport]:
    return [CompileReport(graph=str(i)) for i in range(n)]


def test_indices_are_compile_numbers_after_old_reports_drop():
    history = CompileHistory(maxlen=3)
    reports = _reports(5)
    for report in reports:
        history.append(report)
    assert len(history) == 5 and history.maxlen == 3 and list(history) == reports[2:]
    assert history[4] is reports[4] and history[-1] is reports[4] and history[-3] is reports[2] and history[2] is reports[2]
    assert history[3:] == reports[3:] and history[2:4] == reports[2:4] and history[5:] == []
    assert repr(history) == "CompileHistory(5 compiled, last 3 kept)"


def test_asking_for_a_dropped_report_says_where_every_report_goes():
    history = CompileHistory(maxlen=2)
    for report in _reports(4):
        history.append(report)
    for index in (1, -3, slice(0, 3)):
        with pytest.raises(IndexError, match="compile report [01] was dropped: only the last 2 are kept.*debug_dir"):
            history[index]
    with pytest.raises(IndexError):
        history[4]  # not compiled yet


def test_the_first_compile_idiom():
    """``first = len(history); ...; history[first:]``: the reports of what ran in between."""
    history = CompileHistory(maxlen=2)
    history.append(CompileReport(graph="before"))
    first = len(history)
    later = _reports(2)
    for report in later:
        history.append(report)
    assert history[first:] == later


def test_defaults_and_bad_size():
    assert CompileHistory().maxlen == KEPT_REPORTS == 64 and len(CompileHistory()) == 0
    with pytest.raises(ValueError, match="at least one report"):
        CompileHistory(maxlen=0)


def test_appends_from_threads_are_all_counted():
    history = CompileHistory(maxlen=8)

    def append_many() -> None:
        for _ in range(250):
            history.append(CompileReport())

    threads = [threading.Thread(target=append_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(history) == 1000 and len(list(history)) == 8
