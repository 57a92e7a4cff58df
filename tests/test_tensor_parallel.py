"""Tensor parallelism with transformers' engine: ``from_pretrained(..., tp_plan="auto")`` in 2 processes.

Each test spawns 2 CPU processes (gloo) that load a saved tiny model with ``tp_plan="auto"`` (DTensor
weights: column-parallel q/k/v/gate/up split the output dim, row-parallel o/down the input dim),
attach the plan calibrated on the unsharded model, and generate greedily with the decode step
compiled by ``backend="wisparse"``. The parent process runs the same plan on the unsharded model,
compiled the same way: the tokens must be equal and the logits close (the ranks' partial sums are all-reduced, so only
rounding differs), and on every rank every planned linear must be rewritten (compile report and
debug table). A third test covers shardings the thresholds cannot follow.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import wisparse_compile as wsc
from tests.archs import BY_NAME
from tests.conftest import token_batches
from wisparse_compile.backend import COMPILED_REPORTS
from wisparse_compile.reference import masked_linears

WORLD = 2
PROMPT = torch.tensor([[5, 17, 33, 2, 9]])
NEW_TOKENS = 6
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker: str, tmp_path: Path, *args: str, timeout: float = 240) -> list[dict]:
    """Run ``worker(rank, tmp_path, *args)`` of this module in WORLD processes; their JSON results."""
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(
            os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        )
        code = f"from tests.test_tensor_parallel import {worker}; {worker}({rank}, {str(tmp_path)!r}, *{args!r})"
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-6000:]}"
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def _generate(model: torch.nn.Module) -> tuple[list[int], list[list[float]]]:
    """Greedy tokens and per-step logits, the decode step compiled by the wisparse backend."""
    from transformers import CompileConfig

    config = CompileConfig(backend="wisparse", fullgraph=False)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    out = model.generate(
        input_ids=PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static",
        compile_config=config, return_dict_in_generate=True, output_logits=True, pad_token_id=0,
    )
    return out.sequences[0].tolist(), [step[0].tolist() for step in out.logits]


def _masked_eager_logits(model: torch.nn.Module) -> list:
    """The eager masked reference (no compile) on the prompt: last position's logits."""
    with torch.no_grad(), masked_linears():
        return model(PROMPT).logits[0, -1].tolist()


def _save_model_and_plan(arch: str, folder: Path) -> tuple[torch.nn.Module, wsc.SparsityPlan]:
    model = BY_NAME[arch].build(num_hidden_layers=2)
    model.save_pretrained(folder / "model")
    plan = wsc.calibrate(model, token_batches(1, batch=2, length=16), wsc.SparsityConfig(sparsity=0.5, method="teal"))
    plan.save(folder / "plan.wsp")
    return model, plan


def test_plain_local_shard_is_refused_with_the_reason():
    """A tensor-parallel model whose weights are plain local shards (no DTensor placements to say
    which slice they are) gets a PlanError that says so, not a shape error about another model."""
    from tests.conftest import tiny_llama

    model = tiny_llama(layers=1)
    plan = wsc.calibrate(model, token_batches(1, batch=1, length=8), wsc.SparsityConfig(sparsity=0.5, method="teal", allocation=wsc.Uniform()))
    down = model.model.layers[0].mlp.down_proj
    down.weight = torch.nn.Parameter(down.weight.detach()[:, : down.weight.shape[1] // WORLD].clone())
    model._tp_size = WORLD
    with pytest.raises(wsc.PlanError, match="plain local shard .* no DTensor placements"):
        wsc.attach(model, plan)


# ---- the worker (runs in each spawned process) -------------------------------------------------

def generate_worker(rank: int, folder: str, arch: str) -> None:
    """Load the saved model tensor-parallel, attach the plan, generate; write what the parent checks."""
    import transformers

    torch.set_num_threads(1)
    folder_path = Path(folder)
    os.environ["WISPARSE_DEBUG_DIR"] = str(folder_path / "debug")
    model = getattr(transformers, BY_NAME[arch].model_cls).from_pretrained(folder_path / "model", tp_plan="auto").eval()
    plan = wsc.SparsityPlan.load(folder_path / "plan.wsp")
    wsc.attach(model, plan)
    placements = {n: str(p.placements) for n, p in model.named_parameters() if hasattr(p, "placements")}
    masked = _masked_eager_logits(model)
    tokens, logits = _generate(model)
    with torch.no_grad():
        dense = model.generate(input_ids=PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, disable_compile=True,
                               return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    reports = [
        {"rank": r.rank, "sparse": sorted(d.name for d in r.decisions if d.decision == "sparse"),
         "summary": r.summary()}
        for r in COMPILED_REPORTS
    ]
    result = dict(tokens=tokens, logits=logits, dense_logits=[s[0].tolist() for s in dense.logits],
                  reports=reports, placements=placements, masked=masked)
    (folder_path / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def _check_generation(arch: str, tmp_path: Path) -> None:
    model, plan = _save_model_and_plan(arch, tmp_path)
    wsc.attach(model, plan)
    ref_masked = torch.tensor(_masked_eager_logits(model))
    first = len(COMPILED_REPORTS)
    ref_tokens, ref_logits = _generate(model)  # the single-process sparse model, compiled the same way
    assert [r.rewritten for r in COMPILED_REPORTS[first:]] == [len(plan.names)], "single process: not all sparse"
    ranks = _spawn("generate_worker", tmp_path, arch)

    for rank, got in enumerate(ranks):
        # the weights really are sharded: row-parallel layers split their input dim
        assert any("Shard(dim=1)" in p or "Shard(dim=2)" in p for p in got["placements"].values()), got["placements"]
        assert got["tokens"] == ref_tokens, (rank, got["tokens"], ref_tokens)
        for step, (want, have) in enumerate(zip(ref_logits, got["logits"])):
            torch.testing.assert_close(torch.tensor(have), torch.tensor(want), rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"rank {rank}, step {step}: {m}")
        # the eager masked reference finds each rank's local shards too
        torch.testing.assert_close(torch.tensor(got["masked"]), ref_masked, rtol=1e-4, atol=1e-4)
        decode_logits = torch.tensor(got["logits"][1:])  # the first token comes from the eager, dense prefill
        assert (decode_logits - torch.tensor(got["dense_logits"][1:])).abs().max() > 1e-3, "sparsity changed nothing"
        # every planned linear rewritten on this rank, and the report says which rank it is
        assert got["reports"], f"rank {rank} compiled nothing"
        for report in got["reports"]:
            assert report["rank"] == rank and report["summary"].startswith(f"rank {rank}:"), report
            assert report["sparse"] == sorted(plan.names), (rank, report["summary"])
        # the debug table of each rank, in its own folder
        tables = sorted((tmp_path / "debug" / f"rank{rank}").glob("*/linears.json"))
        assert tables, f"rank {rank} wrote no debug table"
        for table in tables:
            data = json.loads(table.read_text())
            assert data["graph"].endswith(f"@rank{rank}")
            assert sorted(r["module"] for r in data["linears"] if r["decision"] == "sparse") == sorted(plan.names)


@pytest.mark.slow
def test_llama_tensor_parallel_generation_matches_single_process(tmp_path):
    _check_generation("llama", tmp_path)


@pytest.mark.slow
def test_moe_tensor_parallel_generation_matches_single_process(tmp_path):
    """Mixtral: experts' gate/up stack packed column-parallel (``_StridedShard`` on the output dim),
    their down stack row-parallel (``Shard(2)``: each rank takes its slice of every expert's thresholds)."""
    _check_generation("mixtral", tmp_path)


class ShardedToy(torch.nn.Module):
    """Three linears on DTensor weights, each run on local tensors as transformers' engine runs them:
    ``row`` row-parallel (``Shard(1)``, uneven: 7 input channels over 2 ranks), ``strided`` with its
    input channels split by a ``_StridedShard`` (no contiguous slice), ``whole`` as a DTensor op."""

    def __init__(self) -> None:
        super().__init__()
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh
        from torch.distributed.tensor.placement_types import _StridedShard

        self.mesh = init_device_mesh("cpu", (WORLD,))
        g = torch.Generator().manual_seed(0)
        shards = {"row": ((5, 7), Shard(1)), "strided": ((5, 8), _StridedShard(dim=1, split_factor=2)),
                  "whole": ((6, 7), Shard(0))}
        for name, (shape, placement) in shards.items():
            full = torch.randn(*shape, generator=g)
            self.register_parameter(name, torch.nn.Parameter(
                distribute_tensor(full, self.mesh, [placement], src_data_rank=None), requires_grad=False))
        self.replicate = Replicate()

    def forward(self, x7: torch.Tensor, x8: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from torch.distributed.tensor import DTensor

        rank = torch.distributed.get_rank()
        lo = 0 if rank == 0 else 4  # torch.chunk of 7 channels over 2 ranks: 4 + 3
        row = torch.nn.functional.linear(x7[..., lo:lo + self.row.to_local().shape[1]], self.row.to_local())
        strided = torch.nn.functional.linear(x8[..., :4], self.strided.to_local())
        whole = torch.nn.functional.linear(
            DTensor.from_local(x7, self.mesh, [self.replicate], run_check=False), self.whole).to_local()
        return row, strided, whole


def placements_worker(rank: int, folder: str) -> None:
    """Thresholds slices read from placements (even, uneven, experts), the placements that cannot be
    sliced (errors naming them), and a compiled graph that runs those dense with the reason."""
    import warnings

    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor, init_device_mesh
    from torch.distributed.tensor.placement_types import _StridedShard

    from wisparse_compile.planned import sharding_problem, thresholds_of
    from wisparse_compile.mask import masked_input
    from wisparse_compile.sharding import ShardingError, local_thresholds

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (WORLD,))
    result: dict = {}

    def sliced(shape, placement, thresholds, in_dim):
        weight = distribute_tensor(torch.zeros(shape), mesh, [placement], src_data_rank=None)
        return local_thresholds("w", weight, thresholds, in_dim).tolist()

    t7 = torch.arange(7.0)
    result["row_uneven"] = sliced((3, 7), Shard(1), t7, 1)
    result["row_negative_dim"] = sliced((3, 7), Shard(-1), t7, 1)
    result["column"] = sliced((4, 7), Shard(0), t7, 1)
    result["in_out_layout"] = sliced((7, 4), Shard(0), t7, 0)  # [in, out] weight split on its input dim
    experts = torch.arange(4 * 6.0).view(4, 6)  # [E, in] thresholds of [E, out, in] weights
    result["experts_row"] = sliced((4, 3, 6), Shard(2), experts, 2)
    result["experts_parallel"] = sliced((4, 3, 6), Shard(0), experts, 2)
    result["experts_packed_column"] = sliced((4, 8, 6), _StridedShard(dim=1, split_factor=2), experts, 2)
    errors = {}
    for label, weight in {
        "strided_input": distribute_tensor(torch.zeros(3, 8), mesh, [_StridedShard(dim=1, split_factor=2)], src_data_rank=None),
        "partial": DTensor.from_local(torch.zeros(3, 8), mesh, [Partial()], run_check=False),
        "wrong_local_shape": DTensor.from_local(torch.zeros(3, 3), mesh, [Shard(1)], run_check=False,
                                                shape=(3, 8), stride=(8, 1)),
    }.items():
        try:
            local_thresholds("w", weight, torch.zeros(8), 1)
            errors[label] = None
        except ShardingError as e:
            errors[label] = str(e)
    result["errors"] = errors

    # compiled: the row-parallel slice feeds the sparse op; the others run dense, with the reason
    model = ShardedToy()
    g = torch.Generator().manual_seed(1)
    thresholds = {"row": torch.rand(7, generator=g), "strided": torch.rand(8, generator=g), "whole": torch.rand(7, generator=g)}
    plan = wsc.SparsityPlan(
        channel_thresholds=thresholds, sparsities={k: 0.5 for k in thresholds},
        shapes={k: list(getattr(model, k).shape) for k in thresholds}, model_class="ShardedToy", method="teal",
        in_dims={k: 1 for k in thresholds},
    )
    with warnings.catch_warnings(record=True):
        wsc.attach(model, plan)
    result["strided_problem"] = sharding_problem(model.strided)
    result["row_thresholds"] = thresholds_of(model.row).tolist()
    x7, x8 = torch.randn(1, 7, generator=g), torch.randn(1, 8, generator=g)
    with torch.no_grad():
        eager = model(x7, x8)
        compiled = torch.compile(model, backend="wisparse")(x7, x8)
    lo = 0 if rank == 0 else 4
    local_row = model.row.to_local()
    x_row = x7[..., lo:lo + local_row.shape[1]]
    expected_row = torch.nn.functional.linear(masked_input(x_row, thresholds["row"][lo:lo + local_row.shape[1]]), local_row)
    result["row_matches_masked"] = torch.allclose(compiled[0], expected_row, rtol=1e-5, atol=1e-6)
    result["row_differs_from_dense"] = not torch.allclose(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    result["dense_match"] = [torch.allclose(c, e, rtol=1e-5, atol=1e-6) for c, e in zip(compiled[1:], eager[1:])]
    result["row_input_major"] = model.row.to_local().stride() == (1, 5)
    # attach again without the re-layout, then detach: the model's current parameter is the planned one
    with warnings.catch_warnings(record=True):
        wsc.attach(model, plan, input_major=False)
    result["reattached"] = thresholds_of(model.row) is not None and model.row.to_local().is_contiguous()
    wsc.detach(model)
    result["detached"] = thresholds_of(model.row) is None and sharding_problem(model.strided) is None
    report = wsc.last_compile_report()
    result["decisions"] = [(d.name, d.decision.value, d.reason_kind.value if d.reason_kind else None, d.reason)
                           for d in report.decisions]
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_placements_slice_thresholds_or_run_dense_with_the_reason(tmp_path):
    ranks = _spawn("placements_worker", tmp_path)
    for rank, got in enumerate(ranks):
        lo, hi = (0, 4) if rank == 0 else (4, 7)  # torch.chunk: uneven 7 = 4 + 3
        assert got["row_uneven"] == got["row_negative_dim"] == list(range(lo, hi))
        assert got["column"] == list(range(7))  # output dim split: every input channel is local
        assert got["in_out_layout"] == list(range(lo, hi))
        experts = torch.arange(24.0).view(4, 6)
        assert got["experts_row"] == experts[:, 3 * rank:3 * rank + 3].tolist()
        assert got["experts_parallel"] == experts[2 * rank:2 * rank + 2].tolist()
        assert got["experts_packed_column"] == experts.tolist()
        errors = got["errors"]
        assert "input-channel dim is not split in contiguous blocks" in errors["strided_input"], errors
        assert "Partial" in errors["partial"], errors
        assert "uneven layout" in errors["wrong_local_shape"], errors

        assert "_StridedShard" in got["strided_problem"]
        assert got["row_matches_masked"] and got["row_differs_from_dense"], got
        assert got["dense_match"] == [True, True], got
        assert got["row_input_major"] and got["reattached"] and got["detached"], got
        decisions = {name: (outcome, kind, reason) for name, outcome, kind, reason in got["decisions"]}
        assert decisions["row"][0] == "sparse", decisions
        assert decisions["whole"][:2] == ("dense", "tensor-parallel sharding") and "DTensor" in decisions["whole"][2]
        strided = [d for d in got["decisions"] if d[0] is None and d[2] == "tensor-parallel sharding"]
        assert len(strided) == 1 and "_StridedShard" in strided[0][3], got["decisions"]


@pytest.mark.slow
def test_tp_bench_dry_run(tmp_path):
    """``benchmarks/tp_bench.py --dry-run``: both setups run, agree on the greedy tokens, and every rank
    rewrites every planned linear; the JSON and the markdown table are written."""
    from benchmarks import tp_bench

    result = tp_bench.main(["--dry-run", "--out-dir", str(tmp_path)])
    (record,) = result["records"]
    assert record["tokens_equal"] == {"dense": True, "sparse": True}, record["tokens_equal"]
    assert record["rewritten_per_rank"] == [result["setup"]["planned_linears"]] * WORLD
    for setup in ("single", "tp"):
        assert all(v > 0 for v in record[setup]["tokens_per_s"].values())
    path = tmp_path / "tp" / "dry-run" / f"{result['date']}-tiny.json"
    assert json.loads(path.read_text())["setup"]["nproc"] == WORLD
    assert "| 2 ranks (tensor parallel, gloo) |" in path.with_suffix(".md").read_text()
