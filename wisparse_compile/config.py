"""Configuration dataclasses: one per feature (calibration and its allocation strategies, compilation)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from .kernels.routing import DEFAULT_MAX_SPARSE_ROWS
from .quant.primitives import INT4_GROUP_SIZE, WEIGHT_FORMATS

Method = Literal["teal", "wina", "wisparse"]
METHODS: tuple[str, ...] = ("teal", "wina", "wisparse")
Score = Literal["method", "activation", "weight_aware"]
SCORES: tuple[str, ...] = ("method", "activation", "weight_aware")

#: where the measured results of removed allocation options are kept
RESULTS_DOC = "docs/results/allocation.md"


@dataclass(frozen=True)
class AllocationConfig:
    """Base of the allocation strategies: how the global sparsity budget is split over the linears.

    A strategy is a config dataclass derived from this one plus one function registered for its
    type (``allocation.registry.register_strategy``); ``allocation.allocate`` dispatches on the type.
    ``name`` labels the strategy in plan records."""

    name: ClassVar[str] = ""

    @property
    def held_out_tokens(self) -> int:
        """Calibration tokens the strategy scores candidates on, held out of the statistics (0: none)."""
        return 0

    def check_target(self, sparsity: float) -> None:
        """Raise ValueError when the strategy cannot meet the global target ``sparsity``."""

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.name, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Uniform(AllocationConfig):
    """No allocation: every planned linear gets the target (the uniform tables of the TEAL and WINA
    papers; the cheapest calibration)."""

    name: ClassVar[str] = "uniform"


@dataclass(frozen=True)
class Greedy(AllocationConfig):
    """TEAL's allocation, the default of "teal" and "wina": every block gets the target, and inside a
    block a greedy split over its input-sharing groups minimises the block's output mean squared
    error against dense (``allocation/refine.py``), as both papers' released code does."""

    name: ClassVar[str] = "greedy"


@dataclass(frozen=True)
class BlockBounds(AllocationConfig):
    """A strategy that moves sparsity between blocks, each block within
    ``[min_block_sparsity, max_block_sparsity]`` (greedy paths run at most to the upper bound)."""

    min_block_sparsity: float = 0.0
    max_block_sparsity: float = 0.9

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_block_sparsity <= self.max_block_sparsity <= 0.95:
            raise ValueError(
                f"per-block bounds must satisfy 0 <= min_block_sparsity <= max_block_sparsity <= 0.95, got "
                f"[{self.min_block_sparsity}, {self.max_block_sparsity}]"
            )

    def check_target(self, sparsity: float) -> None:
        if sparsity > 0 and not self.min_block_sparsity <= sparsity <= self.max_block_sparsity:
            raise ValueError(
                f"impossible budget: sparsity {sparsity} lies outside the per-block bounds "
                f"[{self.min_block_sparsity}, {self.max_block_sparsity}], so no split across blocks meets it; "
                "widen min_block_sparsity/max_block_sparsity or change the target"
            )


@dataclass(frozen=True)
class Sensitivity(BlockBounds):
    """WiSparse's allocation, the default of "wisparse". Inside a block the greedy split minimises the
    block-output error weighted by the squared gradient of the next-token loss there (a diagonal
    Fisher estimate of the loss increase, next tokens drawn from the model's own distribution with
    ``SparsityConfig.seed``), so every block's error is in one unit; across blocks the budget is
    traded at one exchange rate of estimated loss increase per pruned parameter, read off each
    block's greedy path: no search, no held-out tokens (``allocation/sensitivity.py``).

    band: each block's sparsity also stays within ``sparsity +- band`` (1.0: only the block bounds).
        Unbounded, the first-order estimate spared SmolLM2's first and last blocks down to 0.24-0.40
        at 50%; held to +-0.1, the perplexity rise on a Wikipedia dev split fell from 0.815x to
        0.755x TEAL's (``docs/results/allocation.md``).
    """

    name: ClassVar[str] = "sensitivity"
    band: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.band, (int, float)) or not 0.0 < self.band <= 1.0:
            raise ValueError(f"band must be in (0, 1] (a sparsity deviation; 1.0 leaves only the block bounds), got {self.band!r}")


#: the allocation each method uses unless ``SparsityConfig.allocation`` says otherwise
DEFAULT_ALLOCATION: dict[str, AllocationConfig] = {"teal": Greedy(), "wina": Greedy(), "wisparse": Sensitivity()}

_SEARCH = "allocation=Search(...) (wisparse_compile.allocation.search: an experiment that lost, see " + RESULTS_DOC + ")"
#: options of earlier versions -> what replaced them (or why they went)
_FORMER_OPTIONS: dict[str, str] = {
    "uniform": "use allocation=Uniform()",
    "across_blocks": 'use allocation=Sensitivity() for "sensitivity" (the default of method="wisparse") or '
                     f'{_SEARCH} for "free"; the "depth" profile search was removed',
    "split_error": "use allocation=Greedy() for the plain output error or allocation=Sensitivity() for the "
                   "sensitivity-weighted one",
    "block_band": "use allocation=Sensitivity(band=...)",
    "min_block_sparsity": "use allocation=Sensitivity(min_block_sparsity=...) or Search(min_block_sparsity=...)",
    "max_block_sparsity": "use allocation=Sensitivity(max_block_sparsity=...) or Search(max_block_sparsity=...)",
    **{name: f"use {_SEARCH.replace('Search(...)', f'Search({name}=...)')}"
       for name in ("population", "generations", "mutation_scale", "elite", "validation_tokens")},
    **{name: "removed with the depth-profile search, which never beat its own noise"
       for name in ("profile_degree", "profile_step", "search_evaluations", "selection_tokens")},
    "sensitivity_labels": 'removed: next tokens are always sampled from the model ("data" labels lost on three of four domains)',
    "sensitivity_samples": "removed: one sampled next token per position (four draws lost)",
    "sensitivity_rounds": "removed: one sensitivity estimate (a second round on the masked model lost)",
    "round_inputs": "removed with sensitivity_rounds (a second round on the masked model lost)",
}


@dataclass(frozen=True)
class SparsityConfig:
    """How to calibrate a plan.

    sparsity: target fraction of input channels pruned per token, in [0, 1): the parameter-weighted
        mean of the per-linear sparsities the allocation chooses.
    method: the channel score and the default allocation. "teal": ``|x_i|``, ``Greedy()``; "wina":
        ``|x_i| * ||W[:, i]||_2``, ``Greedy()``; "wisparse": ``|x_i|``, ``Sensitivity()``.
    score: the channel score thresholds apply to: "method" (default) takes the method's own;
        "activation" or "weight_aware" choose one for any method. "wisparse" scored weight-aware until
        issue 19: on SmolLM2 that score lost to ``|x_i|`` at every sparsity under the same allocation.
    allocation: how the budget is split over the linears, a strategy config: ``Uniform()``,
        ``Greedy()``, ``Sensitivity(band=0.1)``, or one registered elsewhere (the KL-fitted
        ``allocation.search.Search``, an experiment that lost); None (default): the method's
        (``DEFAULT_ALLOCATION``). At sparsity 0 every strategy gives every linear 0.
    include: optional regex on linear names (``named_parameters`` name of the weight without
        ``.weight``); default: every linear inside the layers that decode (an encoder-decoder's
        decoder, a vision-language model's language model; ``model_structure``, docs/models.md).
    plan_encoder: without ``include``, plan the layers of the model's other layer lists too (an
        encoder-decoder's encoder, a vision or audio tower): they run once per prompt, not per token.
    max_calibration_tokens: stop collecting statistics after this many tokens (None: all batches).
    histogram_bins_per_octave: resolution of the score histograms that turn a sparsity into a
        threshold (64 bins per factor of two: thresholds within about 1%).
    refinement_tokens, refinement_step: calibration tokens and sparsity step of the greedy split
        inside blocks (every strategy but ``Uniform``).
    seed: seeds the allocation's random draws (``Sensitivity``'s sampled next tokens, ``Search``'s
        population): same seed, same plan.
    masked_recalibration: after allocation, collect the scores again with every planned linear
        masked and take the thresholds from those, so the sparsity holds when all linears are
        sparse (dense-activation thresholds overshoot: 0.63 achieved at a 0.6 target on SmolLM2).

    Options of earlier versions (``uniform``, ``across_blocks``, ``population``, ...) raise a
    TypeError naming what replaced them; the measurements that retired the removed ones are in
    ``docs/results/allocation.md``.
    """

    sparsity: float = 0.5
    method: Method = "wisparse"
    score: Score = "method"
    allocation: AllocationConfig | None = None
    include: str | None = None
    plan_encoder: bool = False
    max_calibration_tokens: int | None = None
    histogram_bins_per_octave: int = 64
    refinement_tokens: int = 512
    refinement_step: float = 0.1
    seed: int = 0
    masked_recalibration: bool = True

    def __new__(cls, *args: Any, **kwargs: Any) -> "SparsityConfig":
        former = sorted(set(kwargs) & set(_FORMER_OPTIONS))
        if former:
            raise TypeError(
                "SparsityConfig: " + "; ".join(f"{name}= is no longer an option: {_FORMER_OPTIONS[name]}" for name in former)
            )
        return super().__new__(cls)

    def __post_init__(self) -> None:
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(
                f"sparsity must be a number in [0, 1), got {self.sparsity!r}: it is the fraction of "
                "input channels pruned per token (0.5 prunes half; 1.0 would prune everything)."
            )
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.allocation is not None and not isinstance(self.allocation, AllocationConfig):
            raise TypeError(
                f"allocation must be a strategy config such as Uniform(), Greedy() or Sensitivity(band=0.1) "
                f"(wisparse_compile.config), or None for the method's default; got {self.allocation!r}"
            )
        if self.max_calibration_tokens is not None and self.max_calibration_tokens <= 0:
            raise ValueError("max_calibration_tokens must be positive or None")
        if self.histogram_bins_per_octave < 4:
            raise ValueError("histogram_bins_per_octave must be at least 4")
        if self.refinement_tokens <= 0 or not 0 < self.refinement_step <= 1:
            raise ValueError(
                f"refinement_tokens must be positive and refinement_step in (0, 1], got "
                f"{self.refinement_tokens!r}, {self.refinement_step!r}"
            )
        self.strategy.check_target(float(self.sparsity))

    @property
    def strategy(self) -> AllocationConfig:
        """The allocation strategy in effect: ``allocation``, else the method's default."""
        return self.allocation if self.allocation is not None else DEFAULT_ALLOCATION[self.method]

    @property
    def weight_aware(self) -> bool:
        """Whether the score multiplies |x_i| by the column norm ||W[:, i]||_2."""
        if self.score != "method":
            return self.score == "weight_aware"
        return self.method == "wina"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (recorded in plans), the allocation as the strategy in effect."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**fields, "allocation": self.strategy.to_dict()}


@dataclass(frozen=True)
class BackendConfig:
    """Options of the ``wisparse`` torch.compile backend, Inductor's included.

    Typed: ``torch.compile(model, backend=wsc.WisparseBackend(mode="reduce-overhead", fuse_siblings=True))``.
    By name: ``torch.compile(model, backend="wisparse", options={"mask_prefill": False})``, where
    every option key that is not a field here goes to Inductor unchanged (torch.compile takes
    ``mode`` or ``options``, not both; the typed form takes both).

    max_sparse_rows: calls with at most this many token rows (decode: batch 1..8) take the
        sparse GEMV kernel; larger calls (prefill) mask the input and run the dense GEMM.
    mask_prefill: if False, linears whose token count is not statically at most
        ``max_sparse_rows`` are left dense (unmasked), as deployed decoders often do.
    debug_dir: write, per compiled graph, the FX graph before/after the pass, their diff and a
        table of every linear's decision here (also set by the ``WISPARSE_DEBUG_DIR`` env var).
    fuse_siblings: fuse sparse linears that read the same input (q/k/v, gate/up; in a
        mixture-of-experts block the shared expert's projections, its gate and the router) into
        one sparse GEMV over their concatenated weights (``passes/fuse_siblings.py``); costs one
        extra copy of those weights in memory, so it is off by default.
    group_quantized: run int8 (or int4) linears that read the same input as one call of the C++
        kernel over each weight's own storage (``passes/group_quantized.py``): no copy, fewer
        dispatches and a better thread split, so it is on by default.
    mode: an Inductor mode of ``torch.compile`` ("reduce-overhead", "max-autotune", ...).
    inductor_options: Inductor config patches, applied over the mode's.

    ``max_sparse_rows`` (default ``kernels.routing.DEFAULT_MAX_SPARSE_ROWS``, 8) is not measured yet:
    the row count above which dense wins has to be measured on a GPU (``benchmarks/kernel_bench.py``).
    """

    max_sparse_rows: int = DEFAULT_MAX_SPARSE_ROWS
    mask_prefill: bool = True
    debug_dir: str | None = None
    fuse_siblings: bool = False
    group_quantized: bool = True
    mode: str | None = None
    inductor_options: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        rows = self.max_sparse_rows
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"max_sparse_rows must be a whole number of token rows, at least 1; got {rows!r}")
        if self.mode is not None:
            from torch._inductor import list_mode_options

            if self.mode not in list_mode_options():
                raise ValueError(f"unknown Inductor mode {self.mode!r}; known: {sorted(list_mode_options())}")
        ours = sorted(set(self.inductor_options) & _BACKEND_FIELDS)
        if ours:
            raise ValueError(f"{ours} are wisparse options, not Inductor's: give them as BackendConfig fields")
        object.__setattr__(self, "inductor_options", dict(self.inductor_options))

    def with_compile_args(self, mode: str | None, options: dict[str, Any] | None) -> "BackendConfig":
        """This config with ``torch.compile``'s ``mode`` and ``options`` applied: option keys that
        name a field (``key`` or ``wisparse.key``) set it, the others are Inductor's."""
        ours: dict[str, Any] = {}
        inductor: dict[str, Any] = dict(self.inductor_options)
        for key, value in (options or {}).items():
            short = key.removeprefix("wisparse.")
            if short in _BACKEND_FIELDS:
                ours[short] = value
            elif key.startswith("wisparse."):
                raise ValueError(f"unknown wisparse backend option {key!r}; known: {sorted(_BACKEND_FIELDS)}")
            else:
                inductor[key] = value
        if mode is not None and self.mode is not None and mode != self.mode:
            raise ValueError(f"torch.compile(mode={mode!r}) contradicts the backend's mode={self.mode!r}: give one")
        return dataclasses.replace(self, **ours, mode=mode or self.mode, inductor_options=inductor)

    def inductor_patches(self) -> dict[str, Any]:
        """The config patches Inductor compiles with: the mode's options, then ``inductor_options``."""
        from torch._inductor import list_mode_options

        patches = dict(list_mode_options(self.mode)) if self.mode not in (None, "default") else {}
        patches.update(self.inductor_options)
        return patches


#: The options that are the backend's own (the rest of ``options`` is Inductor's).
_BACKEND_FIELDS = frozenset(f.name for f in dataclasses.fields(BackendConfig)) - {"mode", "inductor_options"}


@dataclass(frozen=True)
class QuantizeConfig:
    """What ``attach(..., weights="int8"|"int4")`` quantizes.

    weights: the storage format of quantized weights (``"int8"``: symmetric, per output channel;
        ``"int4"``: 4-bit codes -8..7, one scale per input channel and ``group_size`` outputs).
    group_size: outputs per int4 scale group; 32, the only size the int4 kernels take (their
        packed block), so other values are refused rather than silently changed.
    head: also quantize the output head (``model.get_output_embeddings()``),
        which stays dense (not planned) but is the largest single GEMV of a small model's decode step.
    keep_float: keep the original float parameters (referenced, no copy) so ``detach`` restores them
        exactly; False frees them, and ``detach`` restores the dequantized values.
    """

    weights: str = "int8"
    head: bool = True
    keep_float: bool = True
    group_size: int = INT4_GROUP_SIZE

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"QuantizeConfig.weights must be one of {WEIGHT_FORMATS}, got {self.weights!r}")
        if self.group_size != INT4_GROUP_SIZE:
            raise ValueError(
                f"QuantizeConfig.group_size must be {INT4_GROUP_SIZE} (the int4 kernels' block of outputs), got {self.group_size}"
            )
