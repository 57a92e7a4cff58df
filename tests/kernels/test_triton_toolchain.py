"""The ptxas choice for the host's CUDA driver (a pure function; the driver is faked)."""

import pytest

from wisparse_compile.kernels.triton_toolchain import Ptxas, choose_ptxas, env_var_for, ptxas_version

OLD = Ptxas("/t/ptxas", (12, 9))
NEW = Ptxas("/t/ptxas-blackwell", (13, 4))


@pytest.mark.parametrize("driver", [(13, 4), (13, 8), None])
def test_triton_default_when_the_driver_is_new_enough_or_unknown(driver):
    choice = choose_ptxas(driver, NEW, [OLD, NEW], 90)
    assert choice.ptxas == NEW and choice.env_var is None and "Triton's default" in choice.line


def test_an_older_driver_gets_the_newest_ptxas_it_supports_through_tritons_knob():
    choice = choose_ptxas((12, 9), NEW, [OLD, NEW, Ptxas("/t/ptxas-12.2", (12, 2))], 90)
    assert choice.ptxas == OLD and choice.env_var == "TRITON_PTXAS_BLACKWELL_PATH"
    assert "12.9" in choice.line and "13.4" in choice.line and "/t/ptxas" in choice.line
    assert choose_ptxas((12, 4), NEW, [OLD, NEW, Ptxas("/t/p", (12, 2))], 80).env_var == "TRITON_PTXAS_PATH"


def test_no_fitting_ptxas_says_what_to_do():
    choice = choose_ptxas((11, 8), NEW, [OLD, NEW], 90)
    assert choice.ptxas is None and "upgrade the driver" in choice.line and "TRITON_PTXAS_BLACKWELL_PATH" in choice.line


def test_env_var_follows_tritons_arch_split():
    assert env_var_for(80) == "TRITON_PTXAS_PATH" and env_var_for(90) == env_var_for(100) == "TRITON_PTXAS_BLACKWELL_PATH"


def test_bundled_ptxas_versions_are_read():
    import os

    triton = pytest.importorskip("triton")  # Linux x86_64/aarch64 only

    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    versions = [ptxas_version(os.path.join(folder, name)) for name in ("ptxas", "ptxas-blackwell")]
    assert all(v is not None and v >= (12, 0) for v in versions), versions
    assert ptxas_version("/nonexistent/ptxas") is None
