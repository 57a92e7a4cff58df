"""Sibling fusion: q/k/v and gate/up become one fused sparse op, with the same output as unfused."""

import pytest
import torch

import wisparse_compile as wsc
from tests.conftest import tiny_llama, token_batches
from tests.helpers import MaskingHooks, logits
from wisparse_compile.backend import COMPILED_REPORTS
from wisparse_compile.model_io import cache_keyword
from wisparse_compile.passes.fuse_siblings import fused_weight


def _calibrated(seed=0, sparsity=0.5):
    model = tiny_llama(seed, layers=1)
    plan = wsc.calibrate(model, token_batches(2, seed=seed + 10), wsc.SparsityConfig(sparsity=sparsity, method="wina"))
    wsc.attach(model, plan)
    return model, plan


def test_fused_graph_equals_masked_reference():
    """Decode size; the prefill route of the fused op is checked in tests/kernels."""
    rows = 1
    model, plan = _calibrated()
    ids = torch.randint(0, 256, (1, rows), generator=torch.Generator().manual_seed(3))
    fused_model = torch.compile(model, backend="wisparse", options={"fuse_siblings": True})
    out = logits(fused_model, ids)
    result = COMPILED_REPORTS[-1]
    fused = [d for d in result.decisions if d.decision == "fused"]
    # one layer: q/k/v (3) and gate/up (2); o and down read other inputs and stay single
    assert len(fused) == 5 and len({d.node for d in fused}) == 2, result.summary()
    assert result.rewritten == 7
    # (fused == unfused exactly, op by op: tests/kernels/test_sparse_gemv_fused.py)
    with MaskingHooks(model, plan.channel_thresholds):
        ref = logits(model, ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_debug_report_counts_fused(tmp_path):
    model, _ = _calibrated()
    ids = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(3))
    logits(torch.compile(model, backend="wisparse", options={"fuse_siblings": True, "debug_dir": str(tmp_path)}), ids)
    reports = list(tmp_path.rglob("*.json"))
    assert reports, list(tmp_path.rglob("*"))
    text = "".join(p.read_text() for p in reports)
    assert '"fused": 5' in text, text[:2000]


def test_prepared_weight_is_built_once_and_rebuilt_on_change():
    a = torch.nn.Parameter(torch.randn(6, 5))
    b = torch.nn.Parameter(torch.randn(5, 3))  # stored [in, out]: enters transposed
    first = fused_weight([a, b], (False, True))
    assert first.shape == (9, 5) and first.stride() == (1, 9)  # input-major
    torch.testing.assert_close(first, torch.cat([a, b.t()]).detach())
    assert fused_weight([a, b], (False, True)) is first  # cached: no per-call work
    with torch.no_grad():
        a.mul_(2)
    again = fused_weight([a, b], (False, True))
    assert again is not first
    torch.testing.assert_close(again[:6], a.detach())


@pytest.mark.parametrize("fuse", [False, True])
def test_reduce_overhead_and_fullgraph_match(fuse):
    """The single and fused ops compile under reduce-overhead + fullgraph (CPU: no CUDA graphs);
    the typed backend takes the mode together with the fusion option."""
    model, plan = _calibrated()
    ids = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(4))
    backend = wsc.WisparseBackend(mode="reduce-overhead", fuse_siblings=fuse)
    compiled = torch.compile(model.model, backend=backend, fullgraph=True)
    with torch.no_grad():
        out = compiled(ids).last_hidden_state
        out2 = compiled(ids).last_hidden_state
    assert COMPILED_REPORTS[-1].rewritten == 7
    assert sum(d.decision == "fused" for d in COMPILED_REPORTS[-1].decisions) == (5 if fuse else 0)
    with MaskingHooks(model, plan.channel_thresholds), torch.no_grad():
        ref = model.model(ids).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out2, ref, rtol=1e-4, atol=1e-4)


def test_static_cache_decode_matches_masked_reference():
    """Fused decode steps keep the graph's cache writes (the pass removes only what it replaces)."""
    from transformers import StaticCache

    model, plan = _calibrated()
    prompt = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(6))
    keyword = cache_keyword(model)

    def greedy(step, steps=3):
        cache = StaticCache(config=model.config, max_cache_len=8)
        with MaskingHooks(model, plan.channel_thresholds), torch.no_grad():
            out = model(input_ids=prompt, use_cache=True, cache_position=torch.arange(4), **{keyword: cache})
        token, step_logits = out.logits[:, -1:].argmax(-1), []
        with torch.no_grad():
            for i in range(steps):
                pos = torch.tensor([4 + i])
                out = step(input_ids=token, use_cache=True, cache_position=pos, position_ids=pos[None], **{keyword: cache})
                step_logits.append(out.logits)
                token = out.logits[:, -1:].argmax(-1)
        return torch.cat(step_logits, 1)

    fused = greedy(torch.compile(model, backend="wisparse", options={"fuse_siblings": True}))
    assert sum(d.decision == "fused" for d in COMPILED_REPORTS[-1].decisions) == 5
    with MaskingHooks(model, plan.channel_thresholds):
        ref = greedy(model)
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)


class _SharedInput(torch.nn.Module):
    """Linears reading one input [tokens, 16]: two directly, two through a reshape that keeps its
    shape (a block flattens its input and a callee flattens it again); one reads the 3-D original."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 24)
        self.b = torch.nn.Linear(16, 8, bias=False)
        self.c = torch.nn.Linear(16, 4, bias=False)
        self.d = torch.nn.Linear(16, 1, bias=False)
        self.e = torch.nn.Linear(16, 6, bias=False)

    def forward(self, x):
        flat = x.view(-1, 16)
        again = flat.reshape(-1, 16)
        return self.a(flat), self.b(flat), self.c(again), self.d(again), self.e(x)


def _random_plan(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return wsc.SparsityPlan(
        channel_thresholds={n: torch.rand(m.in_features, generator=g) for n, m in linears.items()},
        sparsities={n: 0.5 for n in linears}, shapes={n: list(m.weight.shape) for n, m in linears.items()},
        model_class=type(model).__name__, method="teal",
    )


def _count(gm, target):
    return sum(n.op == "call_function" and n.target is target for n in gm.graph.nodes)


@pytest.mark.parametrize("dynamic", [False, True])
def test_shape_keeping_reshape_reads_the_same_input(lowered_graphs, dynamic):
    torch.manual_seed(0)
    model = _SharedInput().eval()
    wsc.attach(model, _random_plan(model))
    x = torch.randn(1, 3, 16)
    with torch.no_grad():
        single = torch.compile(model, backend="wisparse", dynamic=dynamic)(x)
        torch._dynamo.reset()
        fused = torch.compile(model, backend="wisparse", dynamic=dynamic, options={"fuse_siblings": True})(x)
    gm = lowered_graphs[-1]
    assert COMPILED_REPORTS[-1].rewritten == 5
    ops = torch.ops.wisparse
    assert _count(gm, ops.sparse_linear_group.default) == 1  # a, b, c, d
    assert _count(gm, ops.sparse_linear.default) == 1  # e reads the 3-D input
    (node,) = [n for n in gm.graph.nodes if n.target is ops.sparse_linear_group.default]
    assert len(node.args[1]) == 4 and node.args[0].op == "call_method" and node.args[0].target == "view"
    assert not any(n.op == "call_method" and n.target == "reshape" for n in gm.graph.nodes)  # left unused: removed
    for f, s in zip(fused, single):
        torch.testing.assert_close(f, s, rtol=0, atol=0)


class _Conv1D(torch.nn.Module):
    """A linear stored ``[in, out]`` (1-D-convolution style): ``addmm`` with a bias, ``x @ W`` without."""

    def __init__(self, nx: int, nf: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = torch.nn.Parameter(torch.randn(nf)) if bias else None

    def forward(self, x):
        return torch.addmm(self.bias, x, self.weight) if self.bias is not None else x @ self.weight


class _TransposedSiblings(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = _Conv1D(16, 8), _Conv1D(16, 8), _Conv1D(16, 4, bias=False)

    def forward(self, x):
        x = x.view(-1, 16)
        return self.q(x) * self.k(x), self.v(x)


def test_transposed_siblings_fuse_into_a_valid_graph(lowered_graphs):
    """Siblings written ``x @ W`` (weights [in, out]) enter the pass as ``t()`` views placed before
    each member; the fused call, placed at the first member, must not read a later member's view."""
    torch.manual_seed(0)
    model = _TransposedSiblings().eval()
    names = ["q", "k", "v"]
    g = torch.Generator().manual_seed(1)
    wsc.attach(model, wsc.SparsityPlan(
        channel_thresholds={n: torch.rand(16, generator=g) for n in names}, sparsities=dict.fromkeys(names, 0.5),
        shapes={n: [16, getattr(model, n).weight.shape[1]] for n in names}, in_dims=dict.fromkeys(names, 0),
        model_class=type(model).__name__, method="teal",
    ))
    x = torch.randn(2, 16)
    with torch.no_grad():
        out = torch.compile(model, backend="wisparse", options={"fuse_siblings": True})(x)
        with wsc.masked_linears():
            ref = model(x)
        dense = model(x)
    gm = lowered_graphs[-1]
    gm.graph.lint()
    (fused,) = [n for n in gm.graph.nodes if n.target is torch.ops.wisparse.sparse_linear_group.default]
    assert [w.target for w in fused.args[1]] == [torch.t] * 3
    assert _count(gm, torch.ops.wisparse.sparse_linear.default) == 0
    assert sorted(d.form for d in COMPILED_REPORTS[-1].decisions if d.decision == "fused") == ["addmm", "addmm", "matmul"]
    for o, r, d in zip(out, ref, dense):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
        assert (o - d).abs().max() > 1e-3  # the mask changed something
