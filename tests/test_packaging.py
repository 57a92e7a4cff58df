"""Installs a new user gets: without Triton, and from a built wheel into a brand-new venv."""

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A decode-sized call through the compiled backend on CPU, checked against the eager masked reference.
_CPU_ROUTE = textwrap.dedent("""
    import sys, warnings
    import torch
    import wisparse_compile as wsc
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    batches = [torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))]
    plan = wsc.calibrate(model, batches, wsc.SparsityConfig(sparsity=0.5, method="teal"))
    wsc.attach(model, plan)
    ids = torch.randint(0, 256, (1, 1))
    with torch.no_grad():
        out = torch.compile(model, backend="wisparse")(ids).logits
        with wsc.masked_linears():
            ref = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    print("ok", wsc.__file__)
""")


def _run(code: str, env: dict | None = None, python: str = sys.executable, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


_HIDE_TRITON = "import sys; sys.modules['triton'] = None  # as if Triton were not installed\n"


def test_without_triton_the_package_imports_calibrates_and_runs_the_cpu_route():
    done = _run(_HIDE_TRITON + _CPU_ROUTE + "assert 'triton.language' not in sys.modules\n", env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Triton not available" not in done.stderr  # torch's per-op log line is silenced


def test_without_triton_a_triton_route_call_warns_once_and_runs_the_masked_dense_op():
    code = _HIDE_TRITON + textwrap.dedent("""
        import warnings, torch
        from wisparse_compile.kernels import sparse_linear, sparse_linear_reference, triton_route
        triton_route.TRITON_DEVICES = ("cpu",)  # pretend the CPU were a Triton device
        x, w, t = torch.randn(1, 16), torch.randn(8, 16), torch.full((16,), 0.5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outs = [sparse_linear(x, w, None, t) for _ in range(3)]
        messages = [str(c.message) for c in caught if "Triton is not installed" in str(c.message)]
        assert len(messages) == 1, messages
        assert "pip install triton" in messages[0]
        for out in outs:
            torch.testing.assert_close(out, sparse_linear_reference(x, w, None, t))
    """)
    done = _run(code, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_wheel_installs_into_a_new_venv_and_runs_the_cpu_kernel_and_backend(tmp_path):
    """``pip wheel .`` -> a brand-new venv -> import, build the C++ kernel from the packaged .cpp, compile."""
    source = tmp_path / "source"  # a copy: setuptools writes build/ beside the project it builds
    shutil.copytree(ROOT / "wisparse_compile", source / "wisparse_compile", ignore=shutil.ignore_patterns("__pycache__"))
    for item in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / item, source / item)
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("wisparse_compile-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "wisparse_compile/kernels/cpu_sparse_gemv.cpp" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/", "examples/")) for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    installed = subprocess.run(
        [python, "-m", "pip", "install", "-q", "torch==2.13.0", str(wheel)], capture_output=True, text=True, timeout=900
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "extensions")  # a real build from the wheel's .cpp
    check_kernel = textwrap.dedent("""
        from wisparse_compile.kernels import cpu_kernel_available
        assert cpu_kernel_available(), "the C++ kernel did not build from the wheel"
    """)
    done = _run(check_kernel + _CPU_ROUTE, env=env, python=python, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(venv) in done.stdout  # imported from the venv, not from this checkout
