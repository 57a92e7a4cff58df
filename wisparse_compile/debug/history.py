"""The reports of the graphs compiled in this process: the most recent ones, bounded, tensor-free.

A process that compiles many models (a server compiling per model) must not keep every report
forever: ``CompileHistory`` keeps the last ``maxlen``. Indices are compile numbers, so the idiom
``first = len(history); ...; history[first:]`` (the reports of what ran in between) keeps working
after old reports are dropped. Full records of every graph go where the user asks for them: a
debug directory, ``TORCH_TRACE`` or ``TORCH_LOGS`` (``debug/dump.py``).
"""

from __future__ import annotations

import collections
import threading
from typing import Iterator, overload

from ..passes.decisions import CompileReport

#: Reports kept by default.
KEPT_REPORTS = 64


class CompileHistory:
    """The last ``maxlen`` compile reports, newest last; ``len()`` counts every compile so far.

    ``history[i]`` is the report of the i-th compile (negative: from the newest), ``history[a:b]``
    a list of them; asking for one that was dropped raises IndexError. Thread-safe.
    """

    def __init__(self, maxlen: int = KEPT_REPORTS) -> None:
        if maxlen < 1:
            raise ValueError("a compile history keeps at least one report")
        self._kept: collections.deque[CompileReport] = collections.deque(maxlen=maxlen)
        self._count = 0
        self._lock = threading.Lock()

    @property
    def maxlen(self) -> int:
        return self._kept.maxlen or 0

    def append(self, report: CompileReport) -> None:
        with self._lock:
            self._kept.append(report)
            self._count += 1

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[CompileReport]:
        """The reports kept, oldest first."""
        with self._lock:
            return iter(list(self._kept))

    @overload
    def __getitem__(self, index: int) -> CompileReport: ...
    @overload
    def __getitem__(self, index: slice) -> list[CompileReport]: ...

    def __getitem__(self, index: int | slice) -> CompileReport | list[CompileReport]:
        with self._lock:
            count, kept = self._count, list(self._kept)
        first_kept = count - len(kept)
        numbers = range(count)[index]
        wanted = numbers if isinstance(numbers, range) else [numbers]
        dropped = [n for n in wanted if n < first_kept]
        if dropped:
            raise IndexError(
                f"compile report {dropped[0]} was dropped: only the last {self.maxlen} are kept; for every "
                "graph's report use debug_dir (or WISPARSE_DEBUG_DIR), TORCH_TRACE or TORCH_LOGS"
            )
        picked = [kept[n - first_kept] for n in wanted]
        return picked if isinstance(index, slice) else picked[0]

    def __repr__(self) -> str:
        return f"CompileHistory({self._count} compiled, last {len(self._kept)} kept)"
