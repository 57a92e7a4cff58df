"""Fixtures shared by the pass tests."""

import pytest


@pytest.fixture
def lowered_graphs(monkeypatch):
    """Lower with AOT eager (no C++ compile) and keep each graph the backend hands on."""
    from torch._dynamo.backends.debugging import aot_eager
    import torch._inductor.compile_fx as compile_fx_module

    graphs = []

    def lower(gm, inputs, config_patches=None):
        graphs.append(gm)
        return aot_eager(gm, inputs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", lower)
    return graphs
