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


def dynamo_graph(model, *args):
    """The Dynamo graph of ``model(*args)`` (no_grad) and its example inputs, as a backend receives them."""
    import torch

    captured = []

    def capture(gm, example_inputs):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture, fullgraph=True)(*args)
    return captured[0]
