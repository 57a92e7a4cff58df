"""The configuration dataclasses (``config.py``): their defaults, and a clear error naming each bad field."""

import dataclasses

import pytest

import wisparse_compile as wsc
from wisparse_compile.config import DEFAULT_ALLOCATION, BackendConfig, QuantizeConfig
from wisparse_compile.kernels.routing import DEFAULT_MAX_SPARSE_ROWS


# -- SparsityConfig -------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), "half"])
def test_sparsity_out_of_range(sparsity):
    with pytest.raises(ValueError, match="sparsity must be a number in"):
        wsc.SparsityConfig(sparsity=sparsity)


def test_unknown_method():
    with pytest.raises(ValueError, match="method must be one of"):
        wsc.SparsityConfig(method="magnitude")


def test_each_method_has_its_default_allocation_and_an_explicit_one_wins():
    assert wsc.SparsityConfig(method="teal").strategy == wsc.Greedy()
    assert wsc.SparsityConfig(method="wina").strategy == wsc.Greedy()
    assert wsc.SparsityConfig(method="wisparse").strategy == wsc.Sensitivity(band=0.1)
    assert wsc.SparsityConfig(method="teal", allocation=wsc.Sensitivity(band=0.2)).strategy == wsc.Sensitivity(band=0.2)
    assert wsc.SparsityConfig().to_dict()["allocation"] == {
        "strategy": "sensitivity", "min_block_sparsity": 0.0, "max_block_sparsity": 0.9, "band": 0.1}
    with pytest.raises(TypeError, match="allocation must be a strategy config such as Uniform"):
        wsc.SparsityConfig(allocation="greedy")


def test_score_option_overrides_the_methods_score():
    assert not wsc.SparsityConfig(method="wisparse").weight_aware  # |x|: it beat the weight-aware score on SmolLM2
    assert wsc.SparsityConfig(method="wina").weight_aware
    assert wsc.SparsityConfig(method="wisparse", score="weight_aware").weight_aware
    assert wsc.SparsityConfig(method="teal", score="weight_aware").weight_aware
    assert not wsc.SparsityConfig(method="teal").weight_aware
    with pytest.raises(ValueError, match="score must be one of"):
        wsc.SparsityConfig(score="abs")


def test_impossible_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="impossible budget.*max_block_sparsity"):
        wsc.SparsityConfig(sparsity=0.5, allocation=wsc.Sensitivity(max_block_sparsity=0.4))
    with pytest.raises(ValueError, match="impossible budget"):
        wsc.SparsityConfig(sparsity=0.2, allocation=wsc.Sensitivity(min_block_sparsity=0.3))
    with pytest.raises(ValueError, match="per-block bounds"):
        wsc.Sensitivity(max_block_sparsity=0.99)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        wsc.SparsityConfig(sparsity=1.0)
    with pytest.raises(ValueError, match="refinement_step in"):
        wsc.SparsityConfig(refinement_step=0.0)


@pytest.mark.parametrize("former, replacement", [
    (dict(uniform=True), r"uniform= is no longer an option: use allocation=Uniform\(\)"),
    (dict(across_blocks="free"), r"allocation=Search\(\.\.\.\)"),
    (dict(block_band=None), r"allocation=Sensitivity\(band=\.\.\.\)"),
    (dict(max_block_sparsity=0.8), r"Sensitivity\(max_block_sparsity=\.\.\.\)"),
    (dict(population=3), r"allocation=Search\(population=\.\.\.\)"),
    (dict(validation_tokens=64), r"allocation=Search\(validation_tokens=\.\.\.\)"),
    (dict(split_error="mse"), r"allocation=Greedy\(\)"),
    (dict(sensitivity_rounds=2), "removed: one sensitivity estimate"),
    (dict(round_inputs="masked"), "removed with sensitivity_rounds"),
    (dict(sensitivity_labels="data"), "removed: next tokens are always sampled"),
    (dict(sensitivity_samples=4), "removed: one sampled next token"),
    (dict(profile_degree=2, selection_tokens=64), "profile_degree= .*depth-profile search.*selection_tokens="),
])
def test_former_options_name_what_replaced_them(former, replacement):
    with pytest.raises(TypeError, match=replacement):
        wsc.SparsityConfig(sparsity=0.5, **former)

@pytest.mark.parametrize("field, value, problem", [
    ("max_calibration_tokens", 0, "max_calibration_tokens must be positive or None"),
    ("histogram_bins_per_octave", 3, "histogram_bins_per_octave must be at least 4"),
    ("refinement_tokens", 0, "refinement_tokens must be positive and refinement_step in \\(0, 1\\], got 0, 0.1"),
    ("refinement_step", 1.5, "refinement_tokens must be positive and refinement_step in \\(0, 1\\], got 512, 1.5"),
])
def test_each_bad_field_names_itself(field, value, problem):
    with pytest.raises(ValueError, match=problem):
        wsc.SparsityConfig(**{field: value})


def test_sparsity_config_is_frozen_and_records_every_field():
    config = wsc.SparsityConfig(sparsity=0.3, method="teal", include="mlp", seed=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.sparsity = 0.4
    record = config.to_dict()
    assert set(record) == {f.name for f in dataclasses.fields(wsc.SparsityConfig)}
    assert (record["sparsity"], record["method"], record["include"], record["seed"]) == (0.3, "teal", "mlp", 3)
    assert record["allocation"] == {"strategy": "greedy"}  # the method's default, recorded as in effect
    assert wsc.SparsityConfig(sparsity=0).sparsity == 0  # an int is a number too


def test_sensitivity_band_must_be_a_deviation_in_0_1():
    for band in (0.0, -0.1, 1.5, "wide"):
        with pytest.raises(ValueError, match="band must be in \\(0, 1\\]"):
            wsc.Sensitivity(band=band)
    assert wsc.Sensitivity(band=1.0).band == 1.0


def test_strategies_check_the_target_only_where_they_bound_blocks():
    wsc.Uniform().check_target(0.95)  # no block bounds: any target
    wsc.Greedy().check_target(0.95)
    bounded = wsc.Sensitivity(min_block_sparsity=0.2, max_block_sparsity=0.6)
    bounded.check_target(0.0)  # sparsity 0 plans nothing: no bound applies
    bounded.check_target(0.6)
    with pytest.raises(ValueError, match="impossible budget: sparsity 0.7 lies outside the per-block bounds \\[0.2, 0.6\\]"):
        bounded.check_target(0.7)
    assert all(s.held_out_tokens == 0 for s in DEFAULT_ALLOCATION.values())
    assert wsc.Uniform().to_dict() == {"strategy": "uniform"}


# -- BackendConfig --------------------------------------------------------------------------------


def test_typed_backend_rejects_bad_options():
    with pytest.raises(ValueError, match="unknown Inductor mode 'fastest'"):
        wsc.WisparseBackend(mode="fastest")
    with pytest.raises(ValueError, match="wisparse options, not Inductor's"):
        wsc.WisparseBackend(inductor_options={"fuse_siblings": True})
    with pytest.raises(ValueError, match="contradicts the backend's mode"):
        wsc.BackendConfig(mode="max-autotune").with_compile_args("reduce-overhead", None)

def test_backend_defaults_and_row_bound():
    config = BackendConfig()
    assert config.max_sparse_rows == DEFAULT_MAX_SPARSE_ROWS and config.mask_prefill and config.group_quantized
    assert not config.fuse_siblings and config.mode is None and config.inductor_patches() == {}
    for bad in (0, "8", 2.5, True):
        with pytest.raises(ValueError, match=f"max_sparse_rows must be a whole number of token rows, at least 1; got {bad!r}"):
            BackendConfig(max_sparse_rows=bad)


def test_compile_options_split_into_ours_and_inductors():
    """``options`` keys naming a field (bare or ``wisparse.``-prefixed) set it; the rest go to Inductor,
    over the config's own Inductor options; the config itself is left as it was."""
    base = BackendConfig(inductor_options={"epilogue_fusion": False, "freezing": True})
    config = base.with_compile_args(None, {"max_sparse_rows": 2, "wisparse.fuse_siblings": True, "freezing": False})
    assert (config.max_sparse_rows, config.fuse_siblings) == (2, True)
    assert config.inductor_options == {"epilogue_fusion": False, "freezing": False}
    assert base.inductor_options == {"epilogue_fusion": False, "freezing": True} and base.max_sparse_rows == DEFAULT_MAX_SPARSE_ROWS
    with pytest.raises(ValueError, match="unknown wisparse backend option 'wisparse.bogus'"):
        base.with_compile_args(None, {"wisparse.bogus": 1})
    assert BackendConfig(mode="reduce-overhead").with_compile_args("reduce-overhead", None).mode == "reduce-overhead"
    assert BackendConfig().with_compile_args("max-autotune", None).mode == "max-autotune"


def test_inductor_patches_are_the_modes_then_the_options():
    from torch._inductor import list_mode_options

    config = BackendConfig(mode="reduce-overhead", inductor_options={"triton.cudagraphs": False, "epilogue_fusion": False})
    assert config.inductor_patches() == {**list_mode_options("reduce-overhead"), "triton.cudagraphs": False,
                                         "epilogue_fusion": False}
    assert BackendConfig(mode="default").inductor_patches() == {}
    options = {"epilogue_fusion": False}
    config = BackendConfig(inductor_options=options)
    options["freezing"] = True  # the config keeps its own copy
    assert config.inductor_options == {"epilogue_fusion": False}


# -- QuantizeConfig -------------------------------------------------------------------------------


def test_quantize_config_defaults_and_errors():
    config = QuantizeConfig()
    assert (config.weights, config.head, config.keep_float, config.group_size) == ("int8", True, True, 32)
    assert QuantizeConfig(weights="int4").weights == "int4"
    with pytest.raises(ValueError, match="QuantizeConfig.weights must be one of \\('int8', 'int4'\\), got 'fp8'"):
        QuantizeConfig(weights="fp8")
    with pytest.raises(ValueError, match="group_size must be 32 \\(the int4 kernels' block of outputs\\), got 16"):
        QuantizeConfig(group_size=16)
