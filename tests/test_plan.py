"""SparsityPlan persistence, validation, and the clear errors a user gets for bad input."""

import os
from pathlib import Path

import pytest
import torch

import wisparse_compile as wsc
from tests.conftest import tiny_llama, token_batches
from tests.helpers import one_thread


def test_save_load_roundtrip(wina_plan, tmp_path):
    path = tmp_path / "plan.wsp"
    wina_plan.save(path)
    loaded = wsc.SparsityPlan.load(path)
    assert loaded.names == wina_plan.names and loaded.method == "wina"
    assert loaded.model_class == "LlamaForCausalLM" and loaded.shapes == wina_plan.shapes
    for name in wina_plan.names:
        assert torch.equal(loaded.channel_thresholds[name], wina_plan.channel_thresholds[name])
    assert loaded.sparsities == wina_plan.sparsities and loaded.config["sparsity"] == 0.5


def test_failed_save_leaves_no_file(wina_plan, tmp_path, monkeypatch):
    """A write that fails after the data is out (here: the final rename) leaves neither the plan
    nor the temporary file, and an existing plan at the path is left as it was."""
    import wisparse_compile.files as files_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(files_module.os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        wina_plan.save(tmp_path / "plan.wsp")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    wina_plan.save(tmp_path / "plan.wsp")
    before = (tmp_path / "plan.wsp").read_bytes()
    monkeypatch.setattr(files_module.os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        wina_plan.save(tmp_path / "plan.wsp")
    assert os.listdir(tmp_path) == ["plan.wsp"] and (tmp_path / "plan.wsp").read_bytes() == before


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json"])
def test_corrupted_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "plan.wsp"
    path.write_bytes(content)
    with pytest.raises(wsc.PlanError, match="not a readable wisparse plan.*re-create it with wsc.calibrate"):
        wsc.SparsityPlan.load(path)


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.05])
def test_truncated_plan_file_is_a_clear_error(wina_plan, tmp_path, keep):
    """Cut in the tensor data, near its end, or inside the header: each names the problem and the fix."""
    path = tmp_path / "plan.wsp"
    wina_plan.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(wsc.PlanError, match="truncated or corrupted.*re-create it"):
        wsc.SparsityPlan.load(path)


def _rewrite_metadata(path, edit):
    """Re-save a plan file with its JSON metadata changed by ``edit`` (tensors unchanged)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["wisparse_plan"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(meta)
    save_file(tensors, path, metadata={"wisparse_plan": json.dumps(meta)})


@pytest.mark.parametrize(
    "version, fix", [(0, "it predates this format.*re-create it"), (None, "it predates this format"), (2, "upgrade wisparse-compile")]
)
def test_plan_of_another_format_version(wina_plan, tmp_path, version, fix):
    path = tmp_path / "plan.wsp"
    wina_plan.save(path)
    _rewrite_metadata(path, lambda meta: meta.update(format_version=version) if version is not None else meta.pop("format_version"))
    with pytest.raises(wsc.PlanError, match=f"format version {version!r}, this wisparse-compile reads version 1: {fix}"):
        wsc.SparsityPlan.load(path)


@pytest.mark.parametrize("edit, problem", [
    (lambda meta: meta.pop("sparsities"), "metadata is malformed.*sparsities"),
    (lambda meta: meta.update(names=["not.a.linear"]), "metadata and tensors name different linears"),
    (lambda meta: meta["shapes"].update({next(iter(meta["shapes"])): [3, 3]}), "thresholds for 3 input channels"),
])
def test_inconsistent_plan_file(wina_plan, tmp_path, edit, problem):
    path = tmp_path / "plan.wsp"
    wina_plan.save(path)
    _rewrite_metadata(path, edit)
    with pytest.raises(wsc.PlanError, match=f"{problem}.*re-create it"):
        wsc.SparsityPlan.load(path)


def test_files_that_are_not_plans(tmp_path):
    """A JSON file, a directory, a missing path: each says what it is."""
    (tmp_path / "plan.json").write_text('{"sparsity": 0.5}')
    with pytest.raises(wsc.PlanError, match="not a readable wisparse plan"):
        wsc.SparsityPlan.load(tmp_path / "plan.json")
    with pytest.raises(wsc.PlanError, match="is a directory; give the plan file"):
        wsc.SparsityPlan.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no plan file at"):
        wsc.SparsityPlan.load(tmp_path / "missing.wsp")


def test_safetensors_without_plan_metadata(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"a": torch.zeros(2)}, path)
    with pytest.raises(wsc.PlanError, match="not a wisparse plan.*model weights, perhaps"):
        wsc.SparsityPlan.load(path)


#: written by the code before the allocation strategies (commit db8f993): wisparse's defaults at the
#: time (every former allocation option in its config record), refinement_tokens=64, tiny_llama(seed=0)
#: on token_batches(3, seed=5)
PLAN_BEFORE_STRATEGIES = Path(__file__).parent / "fixtures" / "plan_v1_wisparse.wsp"


def test_a_plan_saved_before_the_allocation_strategies_loads_attaches_and_is_recalibrated_alike():
    """The config a plan records is for the record only: a file whose config names options that are
    gone loads and attaches, and calibrating again with today's defaults gives the same plan."""
    old = wsc.SparsityPlan.load(PLAN_BEFORE_STRATEGIES)
    assert old.method == "wisparse" and old.config["across_blocks"] == "sensitivity" and len(old.names) == 14
    model = tiny_llama(seed=0)
    wsc.attach(model, old)
    wsc.detach(model)
    with one_thread():  # as the file was written: sums then run in the same order
        again = wsc.calibrate(model, token_batches(3, seed=5), wsc.SparsityConfig(sparsity=0.5, refinement_tokens=64))
    assert again.sparsities == old.sparsities
    assert all(torch.equal(again.channel_thresholds[n], old.channel_thresholds[n]) for n in old.names)
    assert again.config["allocation"]["strategy"] == "sensitivity"


def test_plan_errors_name_the_command_that_exists(tmp_path):
    """A bad plan path's error points at the CLI as installed (``wisparse``, pyproject's script)."""
    from wisparse_compile.plan import PlanError, SparsityPlan

    with pytest.raises(PlanError, match="`wisparse calibrate`"):
        SparsityPlan.load(tmp_path)
