"""Compile the Triton sparse GEMV to TTIR for a CUDA target, on a machine without a GPU.

Run in its own process without ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` gives
no compilable function): ``python -m tests.kernels.ttir_check``. Front-end compilation (Python AST
to TTIR) needs no device, and catches what the interpreter lets through: constexpr branches that
do not type-check, dtype mismatches, unsupported ops. Prints one JSON line per variant.
"""

from __future__ import annotations

import inspect
import json
import os

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"

import triton._C.libtriton as libtriton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from wisparse_compile.kernels.triton_sparse_gemv import _sparse_gemv_kernel  # noqa: E402

#: (dtype, NUM_SEGMENTS, BIAS_SEGMENTS bitmask, BLOCK_M, SCALED): plain, biased, fused with some
#: biases, all four; and int8 codes (``w_ptr`` int8, per-column fp32 scales) with bf16 activations.
VARIANTS = [("fp32", 1, 0, 1, 0), ("bf16", 1, 1, 8, 0), ("fp16", 3, 5, 4, 0), ("bf16", 4, 15, 2, 0), ("bf16", 1, 1, 2, 1)]


def ttir(dtype: str, segments: int, bias_segments: int, block_m: int, scaled: int = 0) -> str:
    names = list(_sparse_gemv_kernel.arg_names)
    constants = {"K_PER_SPLIT": 512, "NUM_SEGMENTS": segments, "BIAS_SEGMENTS": bias_segments,
                 "BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 32, "SCALED": scaled}
    signature = {}
    for name in names:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name.startswith(("t", "s")) else ("*i8" if scaled and name == "w_ptr" else f"*{dtype}")
        else:
            signature[name] = "i32"
    source = ASTSource(fn=_sparse_gemv_kernel, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constants.items()})
    target = GPUTarget("cuda", 90, 32)
    backend = CUDABackend(target)
    options = backend.parse_options({})
    context = libtriton.ir.context()
    libtriton.ir.load_dialects(context)
    backend.load_dialects(context)
    args = (options, backend.get_codegen_implementation(options), backend.get_module_map(), context)
    if "target" in inspect.signature(source.make_ir).parameters:
        args = (target, *args)
    return str(source.make_ir(*args))


def main() -> None:
    for variant in VARIANTS:
        text = ttir(*variant)
        print(json.dumps({"variant": variant, "ok": "tt.func" in text, "int64_offsets": "i64" in text,
                          "stores": text.count("tt.store"), "atomics": text.count("atomic")}))


if __name__ == "__main__":
    main()
