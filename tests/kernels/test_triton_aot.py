"""The Triton sparse GEMVs compiled for sm_80 and sm_90 on this GPU-less machine: every kept config
of every routed kernel meets the budgets of a memory-bound GEMV (kernels/triton_aot.py).

Budgets, per compiled config: no spills; registers <= MAX_REGISTERS (4 CTAs of 4 warps per SM);
no layout conversion in the K loop's TTGIR and no barrier in its PTX (the weight tile goes from
global memory straight into the registers that accumulate it); register-streamed (no cp.async);
every weight row a 16-byte vector load (at least BLOCK_K ``ld.global.v4`` per step, no 2-byte
scalar loads), also where N is not a multiple of 16 (a padded weight, as attach lays it out on
CUDA); no atomics (K slices write their own workspace planes). Forms: plain, fused siblings
(3 segments all biased; 4 with biases on two), int8 and int4. The compile runs once, in a subprocess without TRITON_INTERPRET (the suite runs Triton in
its interpreter, which gives no compilable kernels): about 1.5-3 minutes.
"""

import json
import os
import subprocess
import sys

import pytest

from wisparse_compile.kernels import triton_aot
from wisparse_compile.kernels import Layout, sparse_kernels
from wisparse_compile.kernels.triton_sparse_gemv import BLOCK_K_BY_ROWS, MAX_REGISTERS, ROWS_PER_LAUNCH


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "wisparse_compile.kernels.triton_aot"], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines()]


def test_every_case_compiles_for_both_targets_and_every_config(compiled):
    for case in triton_aot.standard_cases():
        form = case.form if case.form in BLOCK_K_BY_ROWS else "float"
        depths = BLOCK_K_BY_ROWS[form][min(case.rows, ROWS_PER_LAUNCH[form])]
        for cc in triton_aot.TARGETS:
            got = sorted(r["config"]["BLOCK_K"] for r in compiled if r["case"] == case.name and r["cc"] == cc)
            assert got == sorted(depths), (case.name, cc)


def test_routed_configs_meet_the_budgets(compiled):
    failures = []
    for r in compiled:
        problems = []
        if r["local_bytes"]:
            problems.append(f"spills {r['local_bytes']} bytes")
        if r["registers"] > MAX_REGISTERS:
            problems.append(f"{r['registers']} registers")
        if r["loop_layout_conversions"]:
            problems.append(f"{r['loop_layout_conversions']} layout conversions in the loop")
        if r["loop_barriers"] or r["cp_async"] or r["atomics"]:
            problems.append(f"{r['loop_barriers']} barriers in the loop, {r['cp_async']} cp.async, {r['atomics']} atomics")
        if r["vector_loads"] < r["config"]["BLOCK_K"] or r["scalar_16bit_loads"]:
            problems.append(f"{r['vector_loads']} 16-byte loads and {r['scalar_16bit_loads']} 2-byte loads")
        if problems:
            failures.append(f"{r['case']} sm_{r['cc']} BLOCK_K={r['config']['BLOCK_K']}: {', '.join(problems)}")
    assert not failures, "\n".join(failures)


def test_every_layout_the_route_table_sends_to_triton_is_in_the_matrix(compiled):
    """Each (layout, Triton) entry of the route table has its kernel form compiled and budgeted above."""
    routed = {layout for layout, device in sparse_kernels.KERNELS if device == sparse_kernels.TRITON}
    assert routed == {Layout.FLOAT, Layout.INT8, Layout.INT4}
    assert {r["form"] for r in compiled} == {"float", "fused3", "fused4", "int8", "int4"}


def test_pipelined_stages_yield_cp_async_on_both_targets():
    """NUM_STAGES > 1 pipelines the K loop through cp.async (compiled and modelled; not autotuned)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch, json; from wisparse_compile.kernels import triton_aot as a, triton_sparse_gemv as g\n"
        "x = torch.empty(1, 1024, dtype=torch.bfloat16); w = torch.empty(1024, 4096, dtype=torch.bfloat16).t(); t = torch.empty(1024)\n"
        "for cc in a.TARGETS:\n"
        "    r = a.compile_call(lambda l: g.sparse_gemv_triton(x, w, [t], [None], [4096], l, launch=g.Launch(None, 8, 16, 4, 2)), cc)[0]\n"
        "    print(json.dumps({'cc': cc, 'cp_async': r.cp_async, 'conv': r.loop_layout_conversions, 'spill': r.local_bytes}))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["cc"] for r in records] == list(triton_aot.TARGETS)
    assert all(r["cp_async"] > 0 and r["conv"] == 0 and r["spill"] == 0 for r in records), records


def test_loop_readers_find_the_loop():
    ttgir = "a\n%r = scf.for %i = %c0 to %c4 step %c1 {\n  ttg.convert_layout x\n  scf.if {\n  }\n}\nttg.convert_layout y\n"
    body = triton_aot.loop_body(ttgir)
    assert body.count("ttg.convert_layout") == 1 and body.endswith("}")
    ptx = "$L__BB0_1:  // =>This Inner Loop Header: Depth=1\n bar.sync 0;\n @%p bra $L__BB0_1;\n bar.sync 0;\n"
    assert [loop.count("bar.sync") for loop in triton_aot.ptx_loops(ptx)] == [1]
