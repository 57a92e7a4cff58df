"""Whether the Triton route exists here: one availability check, so Triton stays optional.

Triton ships wheels for Linux x86_64/aarch64 only, and the CPU wheel of torch does not pull it
in. Importing the package, calibrating and the CPU route never need it; only the Triton sparse
GEMV (``triton_sparse_gemv.py``, imported on first use) does. Where a call would have taken that route
and Triton is missing, it runs the masked dense op instead and one warning says why.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import warnings
from typing import Callable, Iterable

import torch

log = logging.getLogger(__name__)

#: Devices whose decode-sized calls take the Triton sparse GEMV. Not the CPU: compiled Triton needs
#: a GPU driver, and under the interpreter (``TRITON_INTERPRET=1``) ``wrap_triton`` hands back the
#: interpreted kernel, which cannot be traced. A codegen-only test adds "cpu" here to read the code
#: Inductor generates for the Triton route (tests/kernels/inductor_codegen.py).
TRITON_DEVICES: tuple[str, ...] = ("cuda",)

#: Most weights one fused sparse GEMV may concatenate (q/k/v is 3, gate/up 2).
MAX_SEGMENTS = 4


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether ``import triton`` works (checked once per process)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # a broken install counts as missing, with the reason logged
        log.warning("wisparse: triton is installed but does not import (%s: %s)", type(e).__name__, e)
        return False
    return True


_warned_missing = False


def triton_route_possible(device_type: str) -> bool:
    """Whether a decode call on ``device_type`` can take the Triton route; warns once if Triton is missing."""
    global _warned_missing
    if device_type not in TRITON_DEVICES:
        return False
    if triton_available():
        return True
    if not _warned_missing:
        _warned_missing = True
        warnings.warn(
            f"wisparse: Triton is not installed, so sparse linears on {device_type} run the masked dense "
            "op (correct, not faster); `pip install triton` (Linux x86_64/aarch64) enables the sparse GEMV",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def triton_op(name: str, mutates_args: Iterable[str] = ()) -> Callable[[Callable], object]:
    """``torch.library.triton_op``, minus torch's log line per op where Triton is missing.

    The op works either way (its body branches on the device); without Triton the missing route
    is reported once, by ``triton_route_possible``, where a call would have taken it.
    """
    register = torch.library.triton_op(name, mutates_args=tuple(mutates_args))
    if triton_available():
        return register

    def quiet_register(fn: Callable) -> object:
        torch_log = logging.getLogger("torch._library.triton")
        drop_missing = logging.Filter()
        drop_missing.filter = lambda record: "Triton not available" not in record.getMessage()  # type: ignore[method-assign]
        torch_log.addFilter(drop_missing)
        try:
            return register(fn)
        finally:
            torch_log.removeFilter(drop_missing)

    return quiet_register
