"""End to end on a tiny random Llama: calibrate, attach, torch.compile(backend="wisparse"); a model whose
planned linears cannot run sparse compiles dense with one warning."""

import copy
import importlib.metadata
import logging
import sys
import warnings

import pytest
import torch
from torch import nn

import wisparse_compile as wsc
from tests.conftest import calibrated_llama, tiny_llama, token_batches
from tests.helpers import MaskingHooks, logits
from torch._dynamo.utils import counters
from wisparse_compile.runtime import WeightLayoutChanged
from wisparse_compile.backend import COMPILED_REPORTS


class _Net(torch.nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(width, width) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def _net_with_random_plan(seed: int) -> tuple[_Net, wsc.SparsityPlan]:
    torch.manual_seed(seed)
    net = _Net().eval()
    plan = _random_plan(net, seed)
    wsc.attach(net, plan)
    return net, plan


def _random_plan(model: torch.nn.Module, seed: int = 0) -> wsc.SparsityPlan:
    """Random thresholds for the linears of the model's layers (no calibration: cheap)."""
    g = torch.Generator().manual_seed(seed)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n}
    return wsc.SparsityPlan(
        channel_thresholds={n: torch.rand(m.in_features, generator=g) for n, m in linears.items()},
        sparsities=dict.fromkeys(linears, 0.5), shapes={n: list(m.weight.shape) for n, m in linears.items()},
        model_class=type(model).__name__, method="teal",
    )


@pytest.fixture
def inductor_calls(monkeypatch):
    """Lower with AOT eager (no C++ compile) and keep the config patches each call hands Inductor."""
    from torch._dynamo.backends.debugging import aot_eager
    import torch._inductor.compile_fx as compile_fx_module

    calls = []

    def lower(gm, inputs, config_patches=None):
        calls.append((gm, dict(config_patches or {})))
        return aot_eager(gm, inputs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", lower)
    return calls


def _sparse_rows_args(gm):
    return {n.args[-1] for n in gm.graph.nodes if n.target is torch.ops.wisparse.sparse_linear.default}


def test_backend_is_an_entry_point():
    names = [ep.name for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")]
    assert "wisparse" in names
    assert "wisparse" in torch._dynamo.list_backends(exclude_tags=())


@pytest.mark.parametrize("method", ["teal", "wina"])
def test_compiled_equals_masked_reference(method):
    model, plan = calibrated_llama(method=method)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(model, backend="wisparse")
    out = logits(compiled, ids)
    report = COMPILED_REPORTS[-1]
    assert report.rewritten == 14, report.summary()
    dense_left = [d for d in report.decisions if d.decision == "dense"]
    assert [d.reason for d in dense_left] == ["no plan entry"]  # lm_head
    with MaskingHooks(model, plan.channel_thresholds):
        ref = logits(model, ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    dense = logits(model, ids)
    assert (out - dense).abs().max() > 1e-2  # sparsity really changed the output

    # the decode shape (one token) takes its own static graph, also sparse
    one = ids[:, :1]
    out1 = logits(compiled, one)
    with MaskingHooks(model, plan.channel_thresholds):
        torch.testing.assert_close(out1, logits(model, one), rtol=1e-4, atol=1e-4)


def test_sparsity_zero_equals_dense():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 9))
    dense = logits(model, ids)
    plan = wsc.calibrate(model, token_batches(2), wsc.SparsityConfig(sparsity=0.0))
    wsc.attach(model, plan)
    out = logits(torch.compile(model, backend="wisparse"), ids)
    assert COMPILED_REPORTS[-1].rewritten == 14
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_two_instances_with_different_plans_in_one_process():
    a, plan_a = calibrated_llama(seed=0, sparsity=0.5)
    b, plan_b = calibrated_llama(seed=1, sparsity=0.3, method="teal")
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(3))
    out_a = logits(torch.compile(a, backend="wisparse"), ids)
    out_b = logits(torch.compile(b, backend="wisparse"), ids)
    with MaskingHooks(a, plan_a.channel_thresholds):
        torch.testing.assert_close(out_a, logits(a, ids), rtol=1e-4, atol=1e-4)
    with MaskingHooks(b, plan_b.channel_thresholds):
        torch.testing.assert_close(out_b, logits(b, ids), rtol=1e-4, atol=1e-4)
    # and again in the other order: graphs are shared, thresholds are not
    out_a2 = logits(torch.compile(a, backend="wisparse"), ids)
    torch.testing.assert_close(out_a2, out_a, rtol=0, atol=0)


def test_no_plan_compiles_like_inductor():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 8))
    out = logits(torch.compile(model, backend="wisparse"), ids)
    report = COMPILED_REPORTS[-1]
    assert report.rewritten == 0 and {d.reason for d in report.decisions} == {"no plan entry"}
    torch._dynamo.reset()
    ref = logits(torch.compile(model, backend="inductor"), ids)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_plan_attached_after_compiling():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 8))
    compiled = torch.compile(model, backend="wisparse")
    logits(compiled, ids)
    plan = wsc.calibrate(model, token_batches(1), wsc.SparsityConfig())
    # attach re-lays the weights input-major: Dynamo's stride guards recompile, now sparse
    wsc.attach(model, plan)
    out = logits(compiled, ids)
    assert COMPILED_REPORTS[-1].rewritten == 14
    with MaskingHooks(model, plan.channel_thresholds):
        torch.testing.assert_close(out, logits(model, ids), rtol=1e-4, atol=1e-4)
    # without the re-layout nothing triggers a recompile: the stale dense graph says so
    wsc.detach(model)
    torch._dynamo.reset()
    logits(compiled, ids)
    wsc.attach(model, plan, input_major=False)
    with pytest.warns(UserWarning, match="compiled before a plan was attached"):
        logits(compiled, ids)


def test_weights_without_plan_run_dense_through_a_sparse_graph():
    a = tiny_llama(seed=0)
    # same strides as the plain model, so Dynamo reuses the sparse graph for it
    wsc.attach(a, wsc.calibrate(a, token_batches(1), wsc.SparsityConfig()), input_major=False)
    plain = tiny_llama(seed=2)
    ids = torch.randint(0, 256, (1, 8))
    logits(torch.compile(a, backend="wisparse"), ids)
    with pytest.warns(UserWarning, match="weights that have none"):
        out = logits(torch.compile(plain, backend="wisparse"), ids)
    torch.testing.assert_close(out, logits(plain, ids), rtol=1e-5, atol=1e-5)


def test_unmasked_prefill_option():
    model, plan = calibrated_llama()
    compiled = torch.compile(model, backend="wisparse", options={"mask_prefill": False})
    ids = torch.randint(0, 256, (1, 12))
    out = logits(compiled, ids)
    report = COMPILED_REPORTS[-1]
    assert report.rewritten == 0
    assert {d.reason for d in report.decisions if d.name} == {"prefill left dense (mask_prefill=False)"}
    torch.testing.assert_close(out, logits(model, ids), rtol=1e-5, atol=1e-5)
    logits(compiled, ids[:, :1])  # decode shape: sparse
    assert COMPILED_REPORTS[-1].rewritten == 14


def test_mode_and_options_reach_inductor(inductor_calls):
    """backend="wisparse" takes mode= or options= (torch.compile refuses both); our keys stay ours,
    the rest, and the mode's options, reach Inductor's config patches."""
    model, _ = _net_with_random_plan(0)
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.compile(model, backend="wisparse", mode="reduce-overhead")(x)
    gm, patches = inductor_calls[-1]
    assert patches["triton.cudagraphs"] is True and COMPILED_REPORTS[-1].rewritten == 2
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="wisparse", options={"max_sparse_rows": 4, "epilogue_fusion": False})(x)
    gm, patches = inductor_calls[-1]
    assert patches["epilogue_fusion"] is False and "triton.cudagraphs" not in patches
    assert "max_sparse_rows" not in patches and _sparse_rows_args(gm) == {4}
    with pytest.raises(RuntimeError, match="Either mode or options"):
        torch.compile(model, backend="wisparse", mode="reduce-overhead", options={"fuse_siblings": True})
    with pytest.raises(Exception, match="unknown wisparse backend option"), torch.no_grad():
        torch._dynamo.reset()
        torch.compile(model, backend="wisparse", options={"wisparse.bogus": 1})(x)


def test_typed_backend_combines_mode_and_options(inductor_calls):
    model = tiny_llama()
    plan = _random_plan(model)
    wsc.attach(model, plan)
    ids = torch.randint(0, 256, (1, 1))
    backend = wsc.WisparseBackend(
        mode="max-autotune-no-cudagraphs", fuse_siblings=True, max_sparse_rows=2, inductor_options={"epilogue_fusion": False}
    )
    out = logits(torch.compile(model, backend=backend), ids)
    gm, patches = inductor_calls[-1]
    assert patches["max_autotune"] is True and patches["coordinate_descent_tuning"] is True
    assert patches["epilogue_fusion"] is False
    report = wsc.last_compile_report()
    assert report is COMPILED_REPORTS[-1] and report.rewritten == 14
    assert sum(d.decision == "fused" for d in report.decisions) == 10  # q/k/v and gate/up of two layers
    assert {n.args[4] for n in gm.graph.nodes if n.target is torch.ops.wisparse.sparse_linear_group.default} == {2}
    with MaskingHooks(model, plan.channel_thresholds):
        torch.testing.assert_close(out, logits(model, ids), rtol=1e-4, atol=1e-4)
    # torch.compile's own mode= applies over a typed backend that has none
    torch._dynamo.reset()
    logits(torch.compile(model, backend=wsc.WisparseBackend(fuse_siblings=True), mode="reduce-overhead"), ids)
    assert inductor_calls[-1][1]["triton.cudagraphs"] is True
    assert sum(d.decision == "fused" for d in wsc.last_compile_report().decisions) == 10


def test_detach_returns_to_dense():
    model, _ = calibrated_llama()
    wsc.detach(model)
    assert wsc.attached_plan(model) is None
    ids = torch.randint(0, 256, (1, 8))
    out = logits(torch.compile(model, backend="wisparse"), ids)
    assert COMPILED_REPORTS[-1].rewritten == 0
    torch.testing.assert_close(out, logits(model, ids), rtol=1e-5, atol=1e-5)


def test_pass_decisions_are_logged(caplog):
    model, _ = calibrated_llama()
    with caplog.at_level(logging.DEBUG, logger="wisparse_compile"):
        logits(torch.compile(model, backend="wisparse"), torch.randint(0, 256, (1, 4)))
    text = caplog.text
    assert "15 linears: 14 sparse, 1 dense (1 no plan entry)" in text
    assert "sparse: model.layers.0.mlp.down_proj" in text


def test_swapping_plans_on_a_compiled_model_does_not_recompile():
    """attach() of another plan changes thresholds only: the compiled graph keeps serving (no
    Dynamo recompile, no backend call), and its output follows the plan attached now."""
    model = tiny_llama()
    batches = token_batches(2)
    plans = {s: wsc.calibrate(model, batches, wsc.SparsityConfig(sparsity=s, method="teal")) for s in (0.3, 0.6)}
    ids = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(4))  # a decode step
    wsc.attach(model, plans[0.3])
    compiled = torch.compile(model, backend="wisparse")
    logits(compiled, ids)
    graphs, reports = counters["stats"]["unique_graphs"], len(COMPILED_REPORTS)
    outputs = {}
    for s in (0.6, 0.3, 0.6):
        wsc.attach(model, plans[s])
        outputs.setdefault(s, []).append(logits(compiled, ids))
        with MaskingHooks(model, plans[s].channel_thresholds):
            torch.testing.assert_close(outputs[s][-1], logits(model, ids), rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs, "a plan swap recompiled"
    assert len(COMPILED_REPORTS) == reports, "a plan swap called the backend again"
    assert (outputs[0.6][0] - outputs[0.3][0]).abs().max() > 1e-3  # the swap took effect
    torch.testing.assert_close(outputs[0.6][0], outputs[0.6][1], rtol=0, atol=0)


@pytest.mark.parametrize("weights", [None, "int8"])
def test_decode_compile_options_skip_module_guards_and_keep_plan_swaps_exact(weights):
    """With module guards filtered out (``decode_compile_options``) the compiled graph still follows
    plan swaps exactly, without recompiling; the filter is really applied (fewer guards)."""
    if not wsc.decode_compile_options():
        pytest.skip("this torch has no skip_guard_on_all_nn_modules_unsafe")
    model = tiny_llama()
    plans = {s: wsc.calibrate(model, token_batches(2), wsc.SparsityConfig(sparsity=s, method="teal")) for s in (0.3, 0.6)}
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(4))
    wsc.attach(model, plans[0.3], weights=weights)
    wsc.attach(reference, plans[0.3], weights=weights)
    compiled = torch.compile(model, backend="wisparse", options=wsc.decode_compile_options())
    logits(compiled, ids)
    graphs = counters["stats"]["unique_graphs"]
    for s in (0.6, 0.3):
        wsc.attach(model, plans[s], weights=weights)
        wsc.attach(reference, plans[s], weights=weights)
        with MaskingHooks(reference, plans[s].channel_thresholds):
            torch.testing.assert_close(logits(compiled, ids), logits(reference, ids), rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs, "a plan swap recompiled"
    filtered = _guard_count(compiled)
    torch._dynamo.reset()
    plain = torch.compile(model, backend="wisparse")
    logits(plain, ids)
    assert filtered < 0.7 * _guard_count(plain), (filtered, _guard_count(plain))  # tiny model: 182 vs 309


def test_decode_compile_options_drop_inductors_per_call_asserts():
    """The decode options turn off Inductor's size/stride asserts (one per graph input per call);
    a plain compile keeps them."""
    if not wsc.decode_compile_options():
        pytest.skip("this torch has no skip_guard_on_all_nn_modules_unsafe")
    from torch._inductor.utils import run_and_get_code

    model, _ = calibrated_llama()
    ids = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(5))
    codes = {}
    for name, options in (("decode", wsc.decode_compile_options()), ("plain", None)):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="wisparse", options=options)
        out, code = run_and_get_code(lambda: logits(compiled, ids))
        codes[name] = "\n".join(code)
    assert "assert_size_stride(" not in codes["decode"] and "assert_size_stride(" in codes["plain"]
    assert "torch.ops.wisparse_cpu.sparse_gemv" in codes["decode"]  # the same sparse graph, minus the asserts


def _guard_count(compiled) -> int:
    """Guards of the newest cache entry of ``compiled``'s forward (its guard manager's leaves)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    code = compiled._orig_mod.forward.__func__.__code__
    manager = _debug_get_cache_entry_list(code)[0].guard_manager

    def count(node) -> int:
        return len(node.get_leaf_guards()) + sum(count(child) for child in node.get_child_managers())

    return count(manager.root)


def test_guard_filtered_models_of_one_class_each_get_their_graph_on_their_own_backend():
    """Module guards skipped, two tiny Llamas (different configs) compiled on backend objects of their
    own (GreedyDecoder's own_backend) each run their own graph: outputs equal their eager selves."""
    if not wsc.decode_compile_options():
        pytest.skip("this torch has no skip_guard_on_all_nn_modules_unsafe")
    from wisparse_compile.decoding import own_backend

    ids = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(2))
    models = [tiny_llama(seed=0, layers=2), tiny_llama(seed=1, layers=3)]
    for model in models:
        compiled = torch.compile(model, backend=own_backend("wisparse"), options=wsc.decode_compile_options())
        torch.testing.assert_close(logits(compiled, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


def test_weights_swapped_under_a_guard_filtered_graph_raise():
    """Compiled with module guards skipped, a detached model hands the graph row-major float
    weights where it was compiled for input-major ones: a clear error, not a silent wrong result."""
    if not wsc.decode_compile_options():
        pytest.skip("this torch has no skip_guard_on_all_nn_modules_unsafe")
    model, _ = calibrated_llama()
    compiled = torch.compile(model, backend="wisparse", options=wsc.decode_compile_options())
    ids = torch.randint(0, 256, (1, 1))
    logits(compiled, ids)
    wsc.detach(model)
    with pytest.raises(WeightLayoutChanged, match="torch._dynamo.reset"):
        logits(compiled, ids)


def test_attach_warns_once_when_eager_reduced_precision_matmuls_get_slow(monkeypatch, caplog):
    """Re-laying bf16 CPU weights input-major makes eager matmuls slow where the CPU has no native
    bf16 GEMM (AVX2): attach says so, once per process (forced here, whatever this CPU is)."""
    attach_module = sys.modules["wisparse_compile.attach"]
    monkeypatch.setattr(attach_module, "_warned_slow_eager_layout", False)
    monkeypatch.setattr(attach_module, "input_major_gemm_is_slow", lambda w: w.dtype == torch.bfloat16)
    fp32 = tiny_llama()
    plan = wsc.calibrate(fp32, token_batches(1), wsc.SparsityConfig(sparsity=0.5, method="teal"))
    with caplog.at_level(logging.WARNING, logger=attach_module.__name__):
        wsc.attach(fp32, plan)
        assert "EAGER matmuls" not in caplog.text
        for _ in range(2):
            wsc.attach(tiny_llama().to(torch.bfloat16), plan)
    assert caplog.text.count("EAGER matmuls") == 1, caplog.text


def _tensors_in(obj, seen=None) -> list:
    """Every tensor reachable from ``obj`` through containers, dataclasses and object attributes."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (str, int, float, bool, type(None))):
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    children = list(obj.values()) if isinstance(obj, dict) else list(obj) if isinstance(obj, (list, tuple, set)) else (
        list(vars(obj).values()) if hasattr(obj, "__dict__") else [])
    return [t for child in children for t in _tensors_in(child, seen)]


def test_many_compiles_keep_a_bounded_tensor_free_history(inductor_calls, monkeypatch):
    """A process compiling model after model (a server) keeps the last reports only, and a report
    keeps no thresholds alive."""
    import gc
    import weakref

    from wisparse_compile import backend as backend_module
    from wisparse_compile.planned import thresholds_of
    from wisparse_compile.debug import CompileHistory

    assert COMPILED_REPORTS.maxlen == 64  # the process-wide history is bounded
    history = CompileHistory(maxlen=4)
    monkeypatch.setattr(backend_module, "COMPILED_REPORTS", history)
    dropped_thresholds = []
    for i in range(7):
        net, plan = _net_with_random_plan(i)
        with torch.no_grad():
            torch.compile(net, backend="wisparse")(torch.randn(1, 16))
        assert wsc.last_compile_report() is history[-1] and history[-1].rewritten == 2
        dropped_thresholds.append(weakref.ref(thresholds_of(net.layers[0].weight)))
        assert not _tensors_in(history[-1])
        del net, plan
        inductor_calls.clear()  # (the fixture's own record of each graph holds its example inputs)
        torch._dynamo.reset()
    gc.collect()
    assert len(history) == 7 and len(list(history)) == 4
    assert history[3:] == list(history) and history[-4] is history[3]
    with pytest.raises(IndexError, match="only the last 4 are kept"):
        history[2]
    assert all(ref() is None for ref in dropped_thresholds), "a compile report keeps thresholds alive"


def test_two_threads_compile_and_run_two_plans():
    """Two threads compile and run two instances of one model class with two plans: one compiled
    graph may serve both (parameters are inputs), each call reads its own weights' thresholds."""
    import threading

    nets = [_net_with_random_plan(seed) for seed in (0, 1)]
    inputs = [torch.randn(2, 16, generator=torch.Generator().manual_seed(s)) for s in (5, 6)]
    outputs: dict[int, list] = {0: [], 1: []}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(i: int) -> None:
        try:
            compiled = torch.compile(nets[i][0], backend="wisparse")
            start.wait()
            with torch.no_grad():
                for _ in range(3):
                    outputs[i].append(compiled(inputs[i]))
        except BaseException as e:  # reported below, with the thread's traceback
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    for i, (net, plan) in enumerate(nets):
        with torch.no_grad(), MaskingHooks(net, plan.channel_thresholds):
            ref = net(inputs[i])
        with torch.no_grad(), MaskingHooks(net, nets[1 - i][1].channel_thresholds):
            other = net(inputs[i])  # the same net under the other plan: what a mix-up would give
        assert (ref - other).abs().max() > 1e-3
        for out in outputs[i]:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


class _ScaledBlock(nn.Module):
    """A linear the pass cannot rewrite: ``addmm`` with alpha/beta scaling (weight [in, out])."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim) / dim**0.5)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight, beta=0.5, alpha=2.0).relu()


class _ScaledModel(nn.Module):
    def __init__(self, vocab: int = 256, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(_ScaledBlock(dim) for _ in range(2))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids).flatten(0, 1)
        for block in self.blocks:
            x = block(x)
        return x


def test_all_unsupported_linears_compile_dense_with_one_warning():
    torch.manual_seed(0)
    model = _ScaledModel().eval()
    plan = wsc.calibrate(model, token_batches(1, batch=2, length=8), wsc.SparsityConfig(sparsity=0.5))
    assert sorted(plan.names) == ["blocks.0", "blocks.1"] and set(plan.in_dims.values()) == {0}
    wsc.attach(model, plan)
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(model, backend="wisparse", fullgraph=True)(ids)
        dense = model(ids)
    ours = [w for w in caught if "wisparse" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert "none of the 2 planned linears" in str(ours[0].message)
    assert "addmm with alpha/beta scaling" in str(ours[0].message)
    report = COMPILED_REPORTS[-1]
    assert report.rewritten == 0 and all(d.reason == "addmm with alpha/beta scaling" for d in report.decisions)
    torch.testing.assert_close(out, dense)
