"""Configuration dataclasses: one per feature (calibration, compilation)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Method = Literal["teal", "wina", "wisparse"]
METHODS: tuple[str, ...] = ("teal", "wina", "wisparse")
AcrossBlocks = Literal["sensitivity", "depth", "free"]
ACROSS_BLOCKS: tuple[str, ...] = ("sensitivity", "depth", "free")
Score = Literal["method", "activation", "weight_aware"]
SCORES: tuple[str, ...] = ("method", "activation", "weight_aware")
SensitivityLabels = Literal["sampled", "data"]
SENSITIVITY_LABELS: tuple[str, ...] = ("sampled", "data")
SplitError = Literal["sensitivity", "mse"]
RoundInputs = Literal["dense", "masked"]
ROUND_INPUTS: tuple[str, ...] = ("dense", "masked")
SPLIT_ERRORS: tuple[str, ...] = ("sensitivity", "mse")


@dataclass(frozen=True)
class SparsityConfig:
    """How to calibrate a plan.

    sparsity: target fraction of input channels pruned per token, in [0, 1).
    method: "teal" and "wisparse" score a channel by |x_i|; "wina" by |x_i| * ||W[:, i]||_2 (see score).
        "teal" and "wina" split each block's budget greedily over its projections on block-output
        error (as both papers' code does); "wisparse" weighs that error by the output's
        sensitivity and splits the budget across blocks (``split_error``, ``across_blocks``).
    score: the channel score thresholds apply to: "method" (default) takes the method's own
        ("teal", "wisparse": ``|x_i|``; "wina": ``|x_i| * ||W[:, i]||_2``); "activation" or
        "weight_aware" choose one for any method. "wisparse" scored weight-aware until issue 19:
        on SmolLM2 that score lost to ``|x_i|`` at every sparsity under the same allocation.
    uniform: skip allocation: every linear gets the target sparsity (the uniform tables of the
        TEAL and WINA papers; the cheapest calibration).
    include: optional regex on linear names (``named_parameters`` name of the weight without
        ``.weight``); default: every linear inside the layers that decode (an encoder-decoder's
        decoder, a vision-language model's language model; ``model_structure``, docs/models.md).
    plan_encoder: without ``include``, plan the layers of the model's other layer lists too (an
        encoder-decoder's encoder, a vision or audio tower): they run once per prompt, not per token.
    max_calibration_tokens: stop collecting statistics after this many tokens (None: all batches).
    histogram_bins_per_octave: resolution of the score histograms that turn a sparsity into a
        threshold (64 bins per factor of two: thresholds within about 1%).
    split_error: the error "wisparse"'s greedy within-block split minimises: "sensitivity"
        (default) weighs each squared block-output error by the squared gradient of the next-token
        loss there (diagonal Fisher: an estimate of the loss increase, one unit for every block);
        "mse" is TEAL's plain output error ("teal" and "wina" always use it).
    sensitivity_labels: the next tokens whose loss gradient weighs the errors: "sampled" (default)
        draws them from the model's own distribution (seeded by ``seed``), estimating the Fisher
        information, whose quadratic form is KL to the dense model; "data" takes the text's next
        tokens (empirical Fisher). On SmolLM2 at 50% "sampled" gave the lower rise on three of four
        text domains (``benchmarks/results/accuracy_levers.md``).
    sensitivity_samples: with "sampled" labels, next tokens drawn per position; the squared gradients
        are averaged over them (one backward each). 1 (default): 4 draws gave a higher rise on a
        Wikipedia dev split at 50% (+35.9% vs +34.3%, ``accuracy_levers.md``).
    sensitivity_rounds: with ``across_blocks="sensitivity"``, estimate the weights this many times:
        each round after the first re-estimates them on the model masked by the last allocation
        (next tokens from the dense model) and trades again. 1 (default): a second round raised the
        dev rise by half (the squared gradient at the masked point has a first-order part, not only
        curvature; ``accuracy_levers.md``).
    round_inputs: in those later rounds, the block inputs the within-block errors are measured on:
        "dense" (default, the dense model's) or "masked" (what the masked model feeds each block,
        against the block's dense output on them).
    across_blocks: how "wisparse" splits the budget across blocks. "sensitivity" (default; needs
        split_error="sensitivity"): every block's greedy path gives its estimated loss increase
        against its sparsity, and one exchange rate across blocks meets the budget at the least
        summed increase (no search, nothing fitted to validation tokens). "depth": block sparsity
        as a smooth function of depth, ``profile_degree`` Legendre coefficients found by a pattern
        search on KL to dense (``profile_step``, at most ``search_evaluations`` candidates), the
        winner picked among the best few on ``selection_tokens`` the search never scored. "free":
        one free value per block, an evolutionary search on KL to dense (``population``,
        ``generations``, ``mutation_scale``, ``elite``, ``seed``; same seed, same plan). On
        SmolLM2 the free search fitted its validation tokens and its gain did not carry to other
        text (issue 19).
    validation_tokens: held-out tokens (the last batches) scoring a candidate by KL to dense.
    selection_tokens: with ``across_blocks="depth"``, further held-out tokens (the very last
        batches) on which the search's finalists are compared.
    refinement_tokens, refinement_step: calibration tokens and step of the greedy within-block split.
    min_block_sparsity, max_block_sparsity: bounds on any block's sparsity in the search.
    block_band: with ``across_blocks="sensitivity"``, each block's budget also stays within
        ``sparsity +- block_band`` (``None``: only the bounds above). The first-order estimate
        spares the first and last blocks down to 0.24-0.37 at 50%; held to +-0.1, SmolLM2's rise on a
        Wikipedia dev split fell from 0.815x to 0.755x TEAL's (issue 19, chosen on that split).
    masked_recalibration: after allocation, collect the scores again with every planned linear
        masked and take the thresholds from those, so the sparsity holds when all linears are
        sparse (dense-activation thresholds overshoot: 0.63 achieved at a 0.6 target on SmolLM2).
    """

    sparsity: float = 0.5
    method: Method = "wisparse"
    score: Score = "method"
    uniform: bool = False
    include: str | None = None
    plan_encoder: bool = False
    max_calibration_tokens: int | None = None
    histogram_bins_per_octave: int = 64
    # allocation ("teal": greedy split inside blocks; "wisparse": evolutionary search across
    # blocks, then the greedy split); defaults sized for a 30-block 135M model on 2 CPU cores
    split_error: SplitError = "sensitivity"
    sensitivity_labels: SensitivityLabels = "sampled"
    across_blocks: AcrossBlocks = "sensitivity"
    sensitivity_samples: int = 1
    sensitivity_rounds: int = 1
    round_inputs: RoundInputs = "dense"
    profile_degree: int = 2
    profile_step: float = 0.1
    search_evaluations: int = 12
    selection_tokens: int = 1024
    population: int = 8
    generations: int = 8
    mutation_scale: float = 0.05
    elite: int = 2
    validation_tokens: int = 1024
    refinement_tokens: int = 512
    refinement_step: float = 0.1
    min_block_sparsity: float = 0.0
    max_block_sparsity: float = 0.9
    block_band: float | None = 0.1
    seed: int = 0
    masked_recalibration: bool = True

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
        if self.max_calibration_tokens is not None and self.max_calibration_tokens <= 0:
            raise ValueError("max_calibration_tokens must be positive or None")
        if self.histogram_bins_per_octave < 4:
            raise ValueError("histogram_bins_per_octave must be at least 4")
        self._check_allocation()

    def _check_allocation(self) -> None:
        """Search knobs in range, and per-block bounds that can meet the global target."""
        if self.population < 2 or not 1 <= self.elite < self.population:
            raise ValueError(f"need population >= 2 and 1 <= elite < population, got {self.population}, {self.elite}")
        if self.across_blocks not in ACROSS_BLOCKS:
            raise ValueError(f"across_blocks must be one of {ACROSS_BLOCKS}, got {self.across_blocks!r}")
        if self.sensitivity_labels not in SENSITIVITY_LABELS:
            raise ValueError(f"sensitivity_labels must be one of {SENSITIVITY_LABELS}, got {self.sensitivity_labels!r}")
        if self.split_error not in SPLIT_ERRORS:
            raise ValueError(f"split_error must be one of {SPLIT_ERRORS}, got {self.split_error!r}")
        if self.across_blocks == "sensitivity" and self.split_error != "sensitivity":
            raise ValueError(
                'across_blocks="sensitivity" trades budget between blocks by their estimated loss increase, which '
                'needs split_error="sensitivity" (plain output errors of different blocks are not comparable); '
                'set split_error="sensitivity" or choose across_blocks="depth" or "free"'
            )
        if self.sensitivity_samples < 1:
            raise ValueError(f"sensitivity_samples must be at least 1 (sampled next tokens per position), got {self.sensitivity_samples!r}")
        if self.sensitivity_rounds < 1:
            raise ValueError(f"sensitivity_rounds must be at least 1 (1: one estimate, no re-estimation), got {self.sensitivity_rounds!r}")
        if self.round_inputs not in ROUND_INPUTS:
            raise ValueError(f"round_inputs must be one of {ROUND_INPUTS}, got {self.round_inputs!r}")
        if not 1 <= self.profile_degree <= 8:
            raise ValueError(f"profile_degree must be in [1, 8] (coefficients of the depth profile), got {self.profile_degree!r}")
        if not 0 < self.profile_step <= 1:
            raise ValueError(f"profile_step must be in (0, 1] (a sparsity change), got {self.profile_step!r}")
        if self.search_evaluations < 1:
            raise ValueError(f"search_evaluations must be at least 1 (the uniform split), got {self.search_evaluations!r}")
        if self.selection_tokens < 0:
            raise ValueError(f"selection_tokens must be >= 0 (0: select on the search's own tokens), got {self.selection_tokens!r}")
        if self.generations < 0 or self.mutation_scale <= 0:
            raise ValueError("generations must be >= 0 and mutation_scale > 0")
        if self.validation_tokens <= 0 or self.refinement_tokens <= 0 or not 0 < self.refinement_step <= 1:
            raise ValueError("validation_tokens and refinement_tokens must be positive, refinement_step in (0, 1]")
        if self.block_band is not None and not 0.0 < self.block_band <= 1.0:
            raise ValueError(f"block_band must be in (0, 1] (a sparsity deviation) or None, got {self.block_band!r}")
        if not 0.0 <= self.min_block_sparsity <= self.max_block_sparsity <= 0.95:
            raise ValueError(
                f"per-block bounds must satisfy 0 <= min_block_sparsity <= max_block_sparsity <= 0.95, got "
                f"[{self.min_block_sparsity}, {self.max_block_sparsity}]"
            )
        if self.method == "wisparse" and self.sparsity > 0 and not (
            self.min_block_sparsity <= self.sparsity <= self.max_block_sparsity
        ):
            raise ValueError(
                f"impossible budget: sparsity {self.sparsity} lies outside the per-block bounds "
                f"[{self.min_block_sparsity}, {self.max_block_sparsity}], so no split across blocks meets it; "
                "widen min_block_sparsity/max_block_sparsity or change the target"
            )

    @property
    def weight_aware(self) -> bool:
        """Whether the score multiplies |x_i| by the column norm ||W[:, i]||_2."""
        if self.score != "method":
            return self.score == "weight_aware"
        return self.method == "wina"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BackendConfig:
    """Options of the ``wisparse`` torch.compile backend, Inductor's included.

    Typed: ``torch.compile(model, backend=wsc.sparse_backend(mode="reduce-overhead", fuse_siblings=True))``.
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

    ``max_sparse_rows`` = 8 is not measured yet: the row count above which dense wins has to be
    measured on a GPU (``benchmarks/kernel_bench.py``).
    """

    max_sparse_rows: int = 8
    mask_prefill: bool = True
    debug_dir: str | None = None
    fuse_siblings: bool = False
    group_quantized: bool = True
    mode: str | None = None
    inductor_options: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.max_sparse_rows < 1:
            raise ValueError("max_sparse_rows must be at least 1")
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
