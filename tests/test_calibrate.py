"""Calibration (``calibrate.py``): which linears a plan covers, its thresholds per method, the score
statistics behind them, and the clear errors for bad input."""

import pytest
import torch
from torch import nn

import wisparse_compile as wsc
from tests.conftest import tiny_llama, token_batches
from wisparse_compile.calibrate import LinearStats, channel_scores, collect_statistics, column_norms
from wisparse_compile.histogram import ScoreHistogram


def test_plan_covers_block_linears_only(wina_plan):
    plan = wina_plan
    names = plan.names
    assert len(names) == 14  # 7 linears x 2 blocks; lm_head and embeddings stay dense
    assert "model.layers.0.mlp.down_proj" in names and "lm_head" not in names
    t = plan.channel_thresholds["model.layers.0.mlp.down_proj"]
    assert t.shape == (128,) and t.dtype == torch.float32
    assert plan.sparsities["model.layers.1.self_attn.q_proj"] == 0.5
    assert plan.mean_sparsity() == pytest.approx(0.5)


def test_teal_thresholds_are_one_scalar_per_linear():
    plan = wsc.calibrate(tiny_llama(), token_batches(2), wsc.SparsityConfig(sparsity=0.4, method="teal"))
    for t in plan.channel_thresholds.values():
        assert torch.all(t == t[0]) and t[0] > 0


def test_wina_thresholds_are_tau_over_column_norms(wina_plan):
    model = tiny_llama()
    w = model.get_submodule("model.layers.0.mlp.up_proj").weight
    t = wina_plan.channel_thresholds["model.layers.0.mlp.up_proj"]
    tau = t * w.detach().norm(dim=0)
    torch.testing.assert_close(tau, tau[0].expand_as(tau), rtol=1e-5, atol=0)


def test_empty_calibration_data():
    with pytest.raises(ValueError, match="calibration data is empty"):
        wsc.calibrate(tiny_llama(), [], wsc.SparsityConfig())


def test_bad_batch_type():
    with pytest.raises(TypeError, match="calibration batch"):
        wsc.calibrate(tiny_llama(), ["some text"], wsc.SparsityConfig())


def test_sparsity_zero_prunes_nothing():
    plan = wsc.calibrate(tiny_llama(), token_batches(1), wsc.SparsityConfig(sparsity=0.0))
    assert all(torch.all(t == 0) for t in plan.channel_thresholds.values())


def test_include_plans_the_matching_linears_only():
    plan = wsc.calibrate(tiny_llama(), token_batches(1), wsc.SparsityConfig(include=r"mlp\.down_proj$", allocation=wsc.Uniform()))
    assert plan.names == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert plan.in_dims == dict.fromkeys(plan.names, 1) and plan.shapes[plan.names[0]] == [64, 128]


def test_a_model_without_layers_or_matching_linears_is_a_clear_error():
    flat = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).eval()
    batches = [torch.randn(4, 8)]
    with pytest.raises(ValueError, match="Sequential has no layer list.*SparsityConfig\\(include=<regex on names>\\)"):
        wsc.calibrate(flat, batches)
    with pytest.raises(ValueError, match="no linear of Sequential was planned: none of the 0 candidate weights.*include"):
        wsc.calibrate(flat, batches, wsc.SparsityConfig(include="attention"))
    plan = wsc.calibrate(flat, batches, wsc.SparsityConfig(include=r"^\d+$", sparsity=0.25, allocation=wsc.Uniform()))
    assert plan.names == ["0", "2"] and plan.model_class == "Sequential"


def test_statistics_stop_at_max_calibration_tokens_and_restore_training_mode():
    model = tiny_llama().train()
    batches = token_batches(3)  # 3 x (2 x 32) tokens
    every = collect_statistics(model, batches, wsc.SparsityConfig(method="teal"))
    first = collect_statistics(model, batches, wsc.SparsityConfig(method="teal", max_calibration_tokens=64))
    assert model.training  # put back as it was
    assert set(every) == set(first) and len(every) == 14
    assert {s.tokens for s in every.values()} == {192} and {s.tokens for s in first.values()} == {64}
    down = every["model.layers.0.mlp.down_proj"]
    assert (down.shape, down.in_dim, down.column_norms.shape) == ([64, 128], 1, (128,))


def test_plan_records_its_config_and_statistics(wina_plan):
    assert wina_plan.method == "wina" and wina_plan.model_class == "LlamaForCausalLM"
    assert wina_plan.config == wsc.SparsityConfig(sparsity=0.5, method="wina", allocation=wsc.Uniform()).to_dict()
    assert wina_plan.stats["calibration_tokens"] == 128  # 2 batches of 2 x 32 tokens
    assert set(wina_plan.stats["calibration_sparsity"]) == set(wina_plan.names)
    assert wina_plan.stats["allocation"] == {"kind": "uniform"}


def test_column_norms_over_every_dim_but_the_input_channel_and_the_expert():
    w = torch.tensor([[3.0, 0.0], [4.0, 1.0]])  # [out, in]
    torch.testing.assert_close(column_norms(w, 1), torch.tensor([5.0, 1.0]))
    torch.testing.assert_close(column_norms(w, -1), torch.tensor([5.0, 1.0]))
    torch.testing.assert_close(column_norms(w, 0), torch.tensor([3.0, 17.0**0.5]))  # [in, out] weight
    stacked = torch.stack([w, 2 * w])  # [E, out, in]
    torch.testing.assert_close(column_norms(stacked, 2), torch.tensor([[5.0, 1.0], [10.0, 2.0]]))
    assert column_norms(w.half(), 1).dtype == torch.float32


def test_channel_scores_are_magnitudes_times_the_column_norms_when_given():
    x = torch.tensor([[-2.0, 1.0], [0.5, -3.0]])
    torch.testing.assert_close(channel_scores(x, None), x.abs())
    torch.testing.assert_close(channel_scores(x, torch.tensor([1.0, 10.0])), torch.tensor([[2.0, 10.0], [0.5, 30.0]]))


def test_thresholds_are_tau_or_tau_over_column_norms():
    stats = LinearStats("l", [2, 3], 1, torch.tensor([2.0, 0.0, 0.5]), ScoreHistogram(8))
    torch.testing.assert_close(stats.thresholds(1.0, weight_aware=False), torch.tensor([1.0, 1.0, 1.0]))
    # a column of zeros never contributes: its channel is always pruned
    torch.testing.assert_close(stats.thresholds(1.0, weight_aware=True), torch.tensor([0.5, float("inf"), 2.0]))
    experts = LinearStats("e", [2, 2, 3], 2, torch.tensor([[1.0, 2.0, 4.0], [2.0, 2.0, 2.0]]), ScoreHistogram(8))
    tau = torch.tensor([4.0, 1.0])  # one per expert
    torch.testing.assert_close(experts.thresholds(tau, weight_aware=False), torch.tensor([[4.0] * 3, [1.0] * 3]))
    torch.testing.assert_close(experts.thresholds(tau, weight_aware=True), torch.tensor([[4.0, 2.0, 1.0], [0.5] * 3]))
