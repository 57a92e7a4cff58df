"""Shared by the allocation tests: one intra-op thread, a model with one sensitive block, block setup."""

import pytest
import torch

import wisparse_compile as wsc
from tests.conftest import tiny_llama
from tests.helpers import one_thread
from wisparse_compile.allocation.blocks import discover_layout
from wisparse_compile.allocation.registry import Thresholds
from wisparse_compile.calibrate import collect_statistics
from wisparse_compile.weight_slots import weight_slots


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def sensitive_model():
    """4 blocks; block 2 writes 8x larger updates into the residual stream, so masking it costs more."""
    model = tiny_llama(seed=3, layers=4)
    with torch.no_grad():
        block = model.model.layers[2]
        for module in (block.self_attn.o_proj, block.mlp.down_proj):
            module.weight.mul_(8.0)
    return model


def block_setup(model, batches, weight_aware=False):
    """(stats, layout, dense block calls, weight slots, thresholds) of ``model`` on ``batches``."""
    stats = collect_statistics(model, batches, wsc.SparsityConfig(method="wina" if weight_aware else "teal"))
    layout, calls = discover_layout(model, list(stats), batches, torch.device("cpu"))
    return stats, layout, calls, weight_slots(model, stats), Thresholds(stats, weight_aware, torch.device("cpu"))
