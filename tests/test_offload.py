"""Calibrating a model accelerate offloads (``device_map`` with layers on "disk" and "cpu"): the same
plan as the model loaded whole; clear errors where it cannot work (weights nothing loads, attaching
a plan to weights loaded per forward)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import wisparse_compile as wsc
from benchmarks import calibration_memory
from tests.conftest import tiny_llama, token_batches
from tests.helpers import one_thread
from wisparse_compile.model_io import model_device
from wisparse_compile.weight_slots import WatchedWeights, check_loadable, offloaded_weights, weight_slots

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

# embeddings and two middle layers on disk, the rest resident: offloaded layers sit between resident ones
DEVICE_MAP = {
    "model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
    "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
}
TINY_REFINEMENT = dict(refinement_tokens=64)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only add contention (the suite runs beside other work)."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(layers=4).save_pretrained(folder)
    return str(folder)


def _load(folder: str, offload_dir=None) -> nn.Module:
    kwargs = {} if offload_dir is None else {"device_map": DEVICE_MAP, "offload_folder": str(offload_dir)}
    return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


def _assert_same_plan(a: wsc.SparsityPlan, b: wsc.SparsityPlan) -> None:
    assert a.names == b.names and a.sparsities == b.sparsities and a.shapes == b.shapes
    for name in a.names:
        assert torch.equal(a.channel_thresholds[name], b.channel_thresholds[name]), name
    assert a.stats == b.stats  # calibration tokens, achieved sparsities, the allocation's record


@pytest.mark.parametrize("method", ["teal", "wina", "wisparse"])
def test_offloaded_model_calibrates_to_the_full_models_plan(saved, tmp_path, method):
    full, offloaded = _load(saved), _load(saved, tmp_path / "offload")
    names = [n.removesuffix(".weight") for n, _ in full.named_parameters() if n.endswith("proj.weight")]
    on_disk = offloaded_weights(offloaded, names)
    assert on_disk and all(".layers.1." in n or ".layers.2." in n for n in on_disk)  # really offloaded
    assert len(on_disk) == 14 and model_device(offloaded) == torch.device("cpu")  # embeddings on disk: skipped
    config = wsc.SparsityConfig(sparsity=0.5, method=method, **TINY_REFINEMENT)
    plan = wsc.calibrate(offloaded, token_batches(4), config)
    assert len(plan.names) == 28  # every layer's 7 linears, the offloaded ones included
    _assert_same_plan(wsc.calibrate(full, token_batches(4), config), plan)
    assert offloaded_weights(offloaded, names) == on_disk  # calibration left the offloading as it was


def test_accelerate_dispatch_with_offload_folder_calibrates_to_the_same_plan(saved, tmp_path):
    """accelerate's own API (empty model, ``load_checkpoint_and_dispatch``): the offloaded layers are
    written to ``offload_folder`` as memory-mapped arrays, a second storage path of its loader."""
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch

    with init_empty_weights():
        empty = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(saved))
    offloaded = load_checkpoint_and_dispatch(empty, saved, device_map=DEVICE_MAP, offload_folder=str(tmp_path)).eval()
    assert any(p.suffix == ".dat" for p in tmp_path.iterdir())
    config = wsc.SparsityConfig(sparsity=0.5, method="wina", **TINY_REFINEMENT)
    _assert_same_plan(wsc.calibrate(_load(saved), token_batches(3), config),
                      wsc.calibrate(offloaded, token_batches(3), config))


def test_plan_from_offloaded_model_attaches_to_the_resident_model_and_refuses_the_offloaded_one(saved, tmp_path):
    offloaded = _load(saved, tmp_path / "offload")
    plan = wsc.calibrate(offloaded, token_batches(3), wsc.SparsityConfig(sparsity=0.5, method="teal", **TINY_REFINEMENT))
    with pytest.raises(ValueError, match=r"offloaded by accelerate.*attach the plan .* to the model loaded without offloading"):
        wsc.attach(offloaded, plan)
    full = wsc.attach(_load(saved), plan)
    try:
        achieved = wsc.measure_sparsity(full, token_batches(2, seed=7))
    finally:
        wsc.detach(full)
    assert sorted(achieved) == sorted(plan.names)  # every linear masked, the ones calibrated off disk too
    assert all(abs(achieved[n] - plan.sparsities[n]) < 0.1 for n in plan.names), (achieved, plan.sparsities)


def test_meta_weights_that_nothing_loads_are_a_clear_error(saved, tmp_path):
    with torch.device("meta"):
        empty = tiny_llama(layers=2)
    with pytest.raises(ValueError, match=r"meta device and no accelerate hook loads them.*offload_folder"):
        wsc.calibrate(empty, token_batches(2), wsc.SparsityConfig(sparsity=0.5, method="teal"))
    from accelerate.hooks import remove_hook_from_submodules

    offloaded = _load(saved, tmp_path / "offload")
    check_loadable(offloaded)  # its hooks load every meta weight
    remove_hook_from_submodules(offloaded)  # now nothing does
    with pytest.raises(ValueError, match=r"19 parameters .*'model\.embed_tokens\.weight'\) are on the meta device"):
        wsc.calibrate(offloaded, token_batches(2), wsc.SparsityConfig(sparsity=0.5, method="teal"))


def test_watched_weights_follow_a_slot_to_the_tensor_it_holds_now():
    """What accelerate does per forward (a new Parameter in the module) is found by slot; a shared
    weight by any module holding it; activations and freed tensors never match."""
    model = tiny_llama(layers=1)
    shared = model.model.layers[0].mlp.up_proj
    model.model.layers[0].mlp.extra = shared  # the same module (and weight) under a second name
    slots = weight_slots(model, ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"])
    up = slots["model.layers.0.mlp.up_proj"]
    assert len(up.places) == 2
    watched = WatchedWeights(slots.values())
    assert watched.slot_of(shared.weight) == up and watched.slot_of(model.model.layers[0].mlp.gate_proj.weight) is None
    loaded = nn.Parameter(shared.weight.detach().clone())
    shared._parameters["weight"] = loaded  # as accelerate's hook loads a weight for a forward
    assert watched.slot_of(loaded) == up
    assert watched.slot_of(loaded.detach()) is None and watched.slot_of(torch.zeros(3)) is None
    assert weight_slots(model, ["model.layers.0.mlp.up_proj"])["model.layers.0.mlp.up_proj"] == up  # a stable key
    with pytest.raises(ValueError, match="names no parameter"):
        weight_slots(model, ["model.layers.0.mlp.nothing"])


def test_calibration_memory_benchmark_dry_run(tmp_path):
    """benchmarks/calibration_memory.py runs end to end on a tiny Llama, whole and offloaded, and writes its record."""
    result = calibration_memory.main(["--dry-run", "--out-dir", str(tmp_path), "--work-dir", str(tmp_path)])
    path = tmp_path / "calibration_memory" / "dry-run" / f"{result['date']}.json"
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps({k: v for k, v in result.items() if k != "path"}))
    whole, offloaded = data["records"]
    assert whole["planned_linears"] == offloaded["planned_linears"] == 28
    assert whole["offloaded_planned_linears"] == 0 and offloaded["offloaded_planned_linears"] > 0
    assert offloaded["resident_bytes"] < whole["resident_bytes"] == whole["model_bytes"] == offloaded["model_bytes"]
    for case in data["records"]:
        assert case["rss_after_load"] > 0 and case["peak_rss_calibrating"] >= case["rss_after_load"] - (1 << 20)
        assert case["load_before"] and case["load_after"] and case["held_by_settings_estimate"]["histograms"] > 0
    assert "peak RSS calibrating" in path.with_suffix(".md").read_text()


def test_big_models_doc_recipe_runs(saved, tmp_path, monkeypatch):
    """docs/big-models.md's "Calibrating a model that does not fit" code, on the tiny model with most of it on disk."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "big-models.md").read_text()
    section = doc.split("## Calibrating a model that does not fit", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'folder = "path/to/hf-model"' in code and '"2GiB"' in code
    code = code.replace('folder = "path/to/hf-model"', f"folder = {saved!r}").replace('"2GiB"', '"300KB"')
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "docs/big-models.md", "exec"), scope)
    try:
        assert (tmp_path / "plan.wsp").is_file() and wsc.attached_plan(scope["model"]) is not None
        assert len(scope["plan"].names) == 28
    finally:
        wsc.detach(scope["model"])
