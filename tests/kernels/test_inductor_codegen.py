"""Inductor inlines the Triton sparse GEMV into its generated code: checked on CPU, codegen only.

The wrapper code is generated in a separate process without the Triton interpreter, with a stand-in
driver (a CUDA target) and the Triton route opened to CPU tensors; see inductor_codegen.py. On a
GPU, test_sparse_gemv_fused.py checks the same by running the compiled code.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _nvidia_backend() -> bool:
    from triton.backends import backends

    return "nvidia" in backends


@pytest.fixture(scope="module")
def codegen() -> dict:
    if not _nvidia_backend():
        pytest.skip("Triton has no NVIDIA backend to generate code for")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"  # a cached graph would skip the op body (the route)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "tests.kernels.inductor_codegen"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_compiled_decode_step_launches_the_inlined_kernel_per_linear(codegen):
    """One decode token: every planned linear is a launch of our kernel in Inductor's own code."""
    single = codegen["single"]
    assert single["defined"] == ["_sparse_gemv_kernel"]
    assert single["launched"] == ["_sparse_gemv_kernel"] * codegen["planned"] == ["_sparse_gemv_kernel"] * 7
    assert not single["opaque_op"] and not single["cpu_kernel"]


def test_int8_weights_launch_the_inlined_kernel_per_linear_and_for_the_head(codegen):
    """attach(..., weights="int8"): the pass reads the codes and scales off the Int8Weight inputs (AOT
    flattens the subclass) and every planned linear and the int8 head are one launch each."""
    int8 = codegen["int8"]
    assert int8["defined"] == ["_sparse_gemv_kernel"]
    assert int8["launched"] == ["_sparse_gemv_kernel"] * (codegen["planned"] + 1)
    assert not int8["opaque_op"] and not int8["cpu_kernel"]


def test_fused_siblings_launch_one_kernel_per_group(codegen):
    """q/k/v and gate/up each become one launch: 7 linears, 4 launches (qkv, o, gate_up, down)."""
    fused = codegen["fused"]
    assert fused["defined"] == ["_sparse_gemv_kernel"]
    assert fused["launched"] == ["_sparse_gemv_kernel"] * 4
    assert not fused["opaque_op"] and not fused["cpu_kernel"]


@pytest.mark.parametrize("case", ["dynamic", "batch_2_after_1"])
def test_symbolic_batch_keeps_the_sparse_kernel(codegen, case):
    """dynamic=True, and a batch that changes between calls (automatic dynamic): the graph with a
    symbolic batch still launches our kernel for every planned linear (the route is guarded on
    rows <= max_sparse_rows, not silently lowered to masked dense)."""
    graph = codegen[case]
    assert graph["symbolic_rows"]
    assert graph["launched"] == ["_sparse_gemv_kernel"] * 7
    assert not graph["opaque_op"] and not graph["cpu_kernel"]
    assert not codegen["batch_1"]["symbolic_rows"] and codegen["batch_1"]["launched"] == ["_sparse_gemv_kernel"] * 7


def test_one_launch_per_linear_and_few_configs(codegen):
    """No memset or epilogue kernel of ours: the launches are the GEMVs (the tiny weights take one K
    slice, so the kernel stores bias and cast itself). The configs a GPU would compile for the whole
    tiny Llama: one per kernel variant here (the old grid compiled 162 per (M, N, K))."""
    single = codegen["single"]
    assert len(single["launched"]) == 7
    assert single["configs_compiled"] <= 4 * single["kernel_variants"]
    assert single["configs_compiled"] == codegen["fused"]["configs_compiled"] == 4


def test_kernel_compiles_to_ttir_for_mutation_analysis(codegen):
    """Inductor compiles the kernel to TTIR to see which arguments it writes; none fell back to
    'assume every input is mutated' (which would cost copies)."""
    assert codegen["ttir_failures"] == 0
