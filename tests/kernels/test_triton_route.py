"""Whether the Triton route exists (``kernels/triton_route.py``): only on Triton devices, with one warning
where Triton is missing, and a broken install counts as missing."""

import importlib.util
import logging
import sys
import warnings

import torch

from wisparse_compile.kernels import triton_route


def test_the_cpu_never_takes_the_triton_route():
    assert triton_route.TRITON_DEVICES == ("cuda",)
    assert not triton_route.triton_route_possible("cpu") and not triton_route.triton_route_possible("meta")


def test_a_triton_device_takes_it_where_triton_imports(monkeypatch):
    monkeypatch.setattr(triton_route, "triton_available", lambda: True)
    assert triton_route.triton_route_possible("cuda")


def test_missing_triton_is_said_once(monkeypatch):
    monkeypatch.setattr(triton_route, "triton_available", lambda: False)
    monkeypatch.setattr(triton_route, "_warned_missing", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not triton_route.triton_route_possible("cuda")
        assert not triton_route.triton_route_possible("cuda")
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    assert "Triton is not installed, so sparse linears on cuda run the masked dense op" in str(caught[0].message)
    assert "pip install triton" in str(caught[0].message)


def test_availability_is_the_import_not_the_package_being_there(monkeypatch, caplog):
    check = triton_route.triton_available.__wrapped__  # the uncached check
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert check() is False
    monkeypatch.undo()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setitem(sys.modules, "triton", None)  # installed, but importing it fails
    with caplog.at_level(logging.WARNING, logger="wisparse_compile.kernels.triton_route"):
        assert check() is False
    assert "triton is installed but does not import (ModuleNotFoundError: import of triton halted" in caplog.text


def test_op_registration_drops_torchs_missing_triton_line_only(monkeypatch, caplog):
    """Without Triton, ``triton_op`` registers through torch's and filters out torch's own "Triton not
    available" log line (the missing route is reported where a call would take it)."""
    torch_log = logging.getLogger("torch._library.triton")

    def fake_triton_op(name, mutates_args=()):
        def register(fn):
            torch_log.warning("Triton not available: %s runs its fallback", name)
            torch_log.warning("another message")
            return fn

        return register

    monkeypatch.setattr(triton_route, "triton_available", lambda: False)
    monkeypatch.setattr(torch.library, "triton_op", fake_triton_op)
    with caplog.at_level(logging.WARNING, logger="torch._library.triton"):
        fn = triton_route.triton_op("wisparse_test::op")(len)
    assert fn is len
    assert "another message" in caplog.text and "Triton not available" not in caplog.text
    assert not torch_log.filters  # the filter is gone after registering
