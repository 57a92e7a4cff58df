"""Which ptxas assembles the Triton kernels, so that this host's CUDA driver can load the cubins.

Triton assembles PTX with the ptxas in its wheel: for sm_90 and newer its newest one
(``ptxas-blackwell``: CUDA 13.4 in triton 3.9), for older GPUs ``ptxas`` (CUDA 12.9 there). A
cubin built by a CUDA 13 ptxas needs a driver of CUDA 13 or newer; on an older driver the first
launch fails. Where the driver is older than the ptxas Triton would use, the newest bundled (or
``TRITON_PTXAS_PATH``-given) ptxas that the driver supports is chosen instead, through Triton's own
knob (``TRITON_PTXAS_BLACKWELL_PATH`` / ``TRITON_PTXAS_PATH``), and one log line says so. Triton
has no PTX-JIT path (it always loads cubins), so with no such ptxas the Triton route cannot run
here and the line says what to install.

``choose_ptxas`` is the decision, a pure function (tested on the CPU); ``configure_ptxas`` reads the
driver and the tools and applies it once per process (``triton_sparse_gemv`` calls it on import
when a CUDA device is present).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Optional, Sequence

log = logging.getLogger(__name__)

Version = tuple[int, int]


@dataclass(frozen=True)
class Ptxas:
    """A ptxas binary and the CUDA release it comes from."""

    path: str
    cuda: Version


@dataclass(frozen=True)
class Choice:
    """What ``choose_ptxas`` decided: the ptxas to use (None: none the driver can load), the
    environment variable that selects it (None: Triton's default already fits), and why, in one line."""

    ptxas: Optional[Ptxas]
    env_var: Optional[str]
    line: str


def _fmt(v: Version | None) -> str:
    return "unknown" if v is None else f"{v[0]}.{v[1]}"


def env_var_for(arch: int) -> str:
    """Triton's knob for the ptxas it uses on ``sm_{arch}``."""
    return "TRITON_PTXAS_BLACKWELL_PATH" if arch >= 90 else "TRITON_PTXAS_PATH"


def choose_ptxas(driver: Version | None, default: Ptxas, candidates: Sequence[Ptxas], arch: int) -> Choice:
    """The ptxas for ``sm_{arch}`` given the driver's CUDA version: Triton's ``default`` when the
    driver is at least its release (or unknown), else the newest candidate the driver supports."""
    if driver is None or default.cuda <= driver:
        return Choice(default, None, f"wisparse: ptxas {_fmt(default.cuda)} (Triton's default for sm_{arch}); "
                                     f"driver CUDA {_fmt(driver)}")
    fitting = sorted((c for c in candidates if c.cuda <= driver), key=lambda c: c.cuda, reverse=True)
    if not fitting:
        return Choice(None, None, (
            f"wisparse: the CUDA driver ({_fmt(driver)}) is older than every ptxas available "
            f"({', '.join(_fmt(c.cuda) for c in [default, *candidates])}): Triton kernels cannot load here; upgrade "
            f"the driver, or point {env_var_for(arch)} at a CUDA toolkit's ptxas no newer than {_fmt(driver)}"))
    chosen = fitting[0]
    return Choice(chosen, env_var_for(arch), (
        f"wisparse: driver CUDA {_fmt(driver)} is older than Triton's ptxas {_fmt(default.cuda)} for sm_{arch}: "
        f"assembling with ptxas {_fmt(chosen.cuda)} ({chosen.path}) via {env_var_for(arch)}"))


def driver_cuda_version() -> Version | None:
    """The CUDA version the installed driver supports (``cuDriverGetVersion``), None without one."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        value = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(value)) == 0:
            return value.value // 1000, (value.value % 1000) // 10
    return None


def ptxas_version(path: str) -> Version | None:
    """The CUDA release of a ptxas binary (``--version``), None if it does not run."""
    try:
        text = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", text)
    return (int(found.group(1)), int(found.group(2))) if found else None


def bundled_ptxas() -> list[Ptxas]:
    """Every ptxas this process can use: Triton's two (and one a user named in TRITON_PTXAS_PATH)."""
    import triton

    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    paths = [os.path.join(folder, name) for name in ("ptxas", "ptxas-blackwell")]
    if os.environ.get("TRITON_PTXAS_PATH"):
        paths.append(os.environ["TRITON_PTXAS_PATH"])
    found = []
    for path in dict.fromkeys(paths):
        version = ptxas_version(path) if os.path.exists(path) else None
        if version is not None:
            found.append(Ptxas(path, version))
    return found


def triton_default_ptxas(arch: int) -> Ptxas | None:
    """The ptxas Triton itself picks for ``sm_{arch}``."""
    from triton.backends.nvidia import compiler

    path = compiler.get_ptxas(arch).path
    version = ptxas_version(path)
    return None if version is None else Ptxas(path, version)


@functools.lru_cache(maxsize=None)
def configure_ptxas(arch: int) -> Choice:
    """Choose the ptxas for ``sm_{arch}`` on this host and point Triton at it (once per process)."""
    default = triton_default_ptxas(arch)
    if default is None:
        return Choice(None, None, f"wisparse: Triton has no working ptxas for sm_{arch}")
    choice = choose_ptxas(driver_cuda_version(), default, bundled_ptxas(), arch)
    if choice.env_var is not None and choice.ptxas is not None:
        os.environ[choice.env_var] = choice.ptxas.path
        log.warning(choice.line)
    elif choice.ptxas is None:
        log.warning(choice.line)
    else:
        log.info(choice.line)
    return choice
