"""``sharding``: the threshold slice of a tensor-parallel shard, read from its DTensor placements.

One process plays rank 1 of 2 on torch's fake process group (no collectives run; DTensor computes
shard shapes and offsets from the mesh alone). ``test_tensor_parallel.py`` runs the same slices
in two real gloo processes, compiled."""

import pytest
import torch

from wisparse_compile.sharding import (
    ShardingError, describe, is_dtensor, local_tensor, local_thresholds, process_rank, tensor_parallel_size,
    threshold_dims,
)

RANK, WORLD = 1, 2


@pytest.fixture(scope="module")
def mesh():
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    from torch.distributed.tensor import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.distributed.init_process_group("fake", rank=RANK, world_size=WORLD, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
    finally:
        torch.distributed.destroy_process_group()


def _sharded(mesh, shape, placement):
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(torch.zeros(shape), mesh, [placement], src_data_rank=None)


def test_plain_tensors_pass_through():
    weight, thresholds = torch.zeros(3, 7), torch.arange(7.0)
    assert not is_dtensor(weight) and local_tensor(weight) is weight
    assert local_thresholds("w", weight, thresholds, 1) is thresholds
    assert tensor_parallel_size(torch.nn.Linear(2, 2)) == 1
    assert threshold_dims(2, 1) == {1: 0} and threshold_dims(3, 2) == {0: 0, 2: 1}


def test_a_split_input_dim_takes_this_ranks_contiguous_slice(mesh):
    from torch.distributed.tensor import Shard

    t7 = torch.arange(7.0)
    row = _sharded(mesh, (3, 7), Shard(1))  # row-parallel; torch.chunk: 7 = 4 + 3, rank 1 holds 4..6
    assert is_dtensor(row) and local_tensor(row).shape == (3, 3)
    assert local_thresholds("w", row, t7, 1).tolist() == [4.0, 5.0, 6.0]
    assert local_thresholds("w", _sharded(mesh, (3, 7), Shard(-1)), t7, 1).tolist() == [4.0, 5.0, 6.0]
    assert local_thresholds("w", _sharded(mesh, (7, 4), Shard(0)), t7, 0).tolist() == [4.0, 5.0, 6.0]  # [in, out]
    assert describe(row) == "Shard(dim=1) on mesh (tp=2), local [3, 3] of [3, 7]"


def test_a_split_output_dim_keeps_every_threshold(mesh):
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    t7 = torch.arange(7.0)
    assert torch.equal(local_thresholds("w", _sharded(mesh, (4, 7), Shard(0)), t7, 1), t7)  # column-parallel
    experts = torch.arange(24.0).view(4, 6)
    packed = _sharded(mesh, (4, 8, 6), _StridedShard(dim=1, split_factor=2))  # packed gate/up of stacked experts
    assert torch.equal(local_thresholds("w", packed, experts, 2), experts)


def test_stacked_experts_slice_their_expert_and_input_dims(mesh):
    from torch.distributed.tensor import Shard

    experts = torch.arange(24.0).view(4, 6)  # [E, in] thresholds of [E, out, in] weights
    assert local_thresholds("w", _sharded(mesh, (4, 3, 6), Shard(0)), experts, 2).tolist() == experts[2:].tolist()
    assert local_thresholds("w", _sharded(mesh, (4, 3, 6), Shard(2)), experts, 2).tolist() == experts[:, 3:].tolist()


def test_placements_without_a_contiguous_slice_name_the_weight_and_the_fix(mesh):
    from torch.distributed.tensor import DTensor, Partial, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    strided = _sharded(mesh, (3, 8), _StridedShard(dim=1, split_factor=2))
    with pytest.raises(ShardingError, match="q_proj: .*input-channel dim is not split in contiguous blocks.*plain Shard"):
        local_thresholds("q_proj", strided, torch.zeros(8), 1)
    partial = DTensor.from_local(torch.zeros(3, 8), mesh, [Partial()], run_check=False)
    with pytest.raises(ShardingError, match="Partial .*tp_plan that shards weights"):
        local_thresholds("w", partial, torch.zeros(8), 1)
    wrong = DTensor.from_local(torch.zeros(3, 3), mesh, [Shard(1)], run_check=False, shape=(3, 8), stride=(8, 1))
    with pytest.raises(ShardingError, match="uneven layout"):
        local_thresholds("w", wrong, torch.zeros(8), 1)


def test_rank_and_tensor_parallel_size(mesh):
    assert process_rank() == RANK
    model = torch.nn.Linear(2, 2)
    model._tp_size = WORLD
    assert tensor_parallel_size(model) == WORLD
