"""Codegen-only look at the code Inductor generates for the Triton route, on a machine without a GPU.

Run as a script in its own process (``python -m tests.kernels.inductor_codegen``), WITHOUT
``TRITON_INTERPRET``: under the interpreter ``@triton.jit`` gives an ``InterpretedFunction`` and
``wrap_triton`` returns it as is, so a ``triton_op`` that launches it cannot be traced (its fake
run hands fake tensors to the interpreter). Without the interpreter the kernel is a
``JITFunction``, the op traces to ``triton_kernel_wrapper_functional`` and Inductor lowers it as a
user-defined Triton kernel. Two stand-ins make that work on a CPU-only machine:

- ``CodegenOnlyDriver``: Triton's active driver, reporting a CUDA sm_80 target. Inductor asks the
  driver for the target to hash its backend and to compile the kernel to TTIR (the mutation
  analysis); both need no device.
- ``TRITON_DEVICES`` gains "cpu", so decode-sized CPU calls take the Triton route while tracing.

Inductor's ``compile_to_module`` is replaced by: generate the wrapper code, record it, stop. No
kernel is compiled to a binary or run. Prints one JSON line: per case, the user Triton kernels
defined in the wrapper and launched by it, whether an opaque ``torch.ops.wisparse`` or the C++
kernel is called, and how often the TTIR analysis failed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Callable
from unittest import mock

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET (see the module docstring)"

import torch  # noqa: E402
from torch._inductor.graph import GraphLowering  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

import wisparse_compile as wsc  # noqa: E402
import wisparse_compile.kernels.triton_sparse_gemv  # noqa: E402,F401  (a JITFunction: before tests.conftest sets TRITON_INTERPRET)
from tests.conftest import tiny_llama, token_batches  # noqa: E402


class CodegenOnlyDriver:
    """Triton's active driver on a machine without a GPU: a target to generate code for, nothing else."""

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 80, 32)


class _CodegenDone(Exception):
    pass


class _CountRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def wrapper_code(fn: Callable[[], object]) -> str:
    """The Python wrapper code Inductor generates while ``fn`` compiles (generated, never run)."""
    codes: list[str] = []

    def compile_to_module(self: GraphLowering) -> object:
        wrapper, _kernels = self.codegen()
        codes.append(wrapper.value)
        raise _CodegenDone

    with mock.patch.object(GraphLowering, "compile_to_module", compile_to_module):
        try:
            fn()
        except Exception:
            if not codes:
                raise
    return "\n".join(codes)


def summarize(code: str) -> dict[str, object]:
    defined = re.findall(r"^(\w+) = async_compile\.triton\('(\w+)'", code, flags=re.MULTILINE)
    names = {var: kernel for var, kernel in defined}
    # A user kernel's definition lists its autotune configs; a GPU compiles each once per key.
    configs = [len(re.findall(r"\{'BLOCK_N'", block)) for block in re.findall(r"configs=\[(.*?)\],\n", code)]
    return {
        "defined": sorted(set(names.values())),
        "launched": [names.get(var, var) for var in re.findall(r"(\w+)\.run\(", code)],
        "opaque_op": "torch.ops.wisparse." in code,
        "cpu_kernel": "wisparse_cpu" in code,
        "kernel_variants": len(defined),
        "configs_compiled": sum(configs),
        "symbolic_rows": bool(re.search(r"\.run\([^\n]*\b[k]?s\d+\b", code)),
    }


def main() -> None:
    triton_route = sys.modules["wisparse_compile.kernels.triton_route"]
    model = tiny_llama(layers=1)
    plan = wsc.calibrate(model, token_batches(1), wsc.SparsityConfig(sparsity=0.5, method="teal"))
    wsc.attach(model, plan)
    ids = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(0))  # one decode token

    driver.set_active(CodegenOnlyDriver())
    triton_route.TRITON_DEVICES = ("cuda", "cpu")
    ttir = _CountRecords()
    logging.getLogger("torch._dynamo").addHandler(ttir)  # where triton_kernel_wrap logs
    report: dict[str, object] = {"planned": len(plan.names)}
    for name, options in (("single", {}), ("fused", {"fuse_siblings": True})):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="wisparse", options=options)
        with torch.no_grad():
            report[name] = summarize(wrapper_code(lambda: compiled(ids)))
    # A symbolic batch: dynamic=True on a decode step of 3 tokens rows, and a batch that changes
    # between calls (1, then 2: automatic dynamic recompiles with a symbolic batch).
    batch = lambda b: torch.randint(0, 256, (b, 1), generator=torch.Generator().manual_seed(b))  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="wisparse", dynamic=True)
    with torch.no_grad():
        report["dynamic"] = summarize(wrapper_code(lambda: compiled(batch(3))))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="wisparse")
    with torch.no_grad():
        report["batch_1"] = summarize(wrapper_code(lambda: compiled(batch(1))))
        report["batch_2_after_1"] = summarize(wrapper_code(lambda: compiled(batch(2))))
    torch._dynamo.reset()
    wsc.attach(model, plan, weights="int8")  # int8 codes + scales: the same kernel, SCALED
    compiled = torch.compile(model, backend="wisparse")
    with torch.no_grad():
        report["int8"] = summarize(wrapper_code(lambda: compiled(ids)))
    report["ttir_failures"] = sum("identify_accessed_tensors" in m for m in ttir.messages)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
