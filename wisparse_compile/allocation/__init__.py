"""Per-linear sparsity allocation: one global budget, split by a strategy behind a registry.

``SparsityConfig.strategy`` names the strategy (a config dataclass); ``allocate`` runs the function
registered for its type (``registry``). The strategies, each a config and one function:

- ``Uniform()`` (``registry``): every linear at the target.
- ``Greedy()`` (``refine``; the default of "teal" and "wina"): every block at the target; inside a
  block a greedy split over input-sharing groups minimises the block's output reconstruction
  error, as TEAL's code does and WINA's released code does too (with its weight-aware score).
- ``Sensitivity(band=0.1)`` (``sensitivity``; the default of "wisparse"): the same greedy on
  block-output errors weighted by the output's sensitivity (diagonal Fisher: an estimate of the
  loss increase), and the budget traded across blocks at one exchange rate read off every block's
  greedy path (``budgets.lagrangian_budgets``; no search, no held-out tokens).
- ``search.Search(...)``: an experiment that lost, on request only: block budgets by an evolutionary search
  on KL to dense over held-out tokens.

The modules: ``blocks`` (decoder layers and input-sharing groups, found by dataflow), ``masking``
(running the model under candidate thresholds), ``refine`` (the within-block greedy), ``budgets``
(budgets across blocks), ``sensitivity``, ``search``, ``registry``.
"""

from __future__ import annotations

from . import refine, search, sensitivity  # noqa: F401  (importing a strategy's module registers it)
from .masking import candidate_masks
from .registry import Allocation, AllocationProblem, allocate, register_strategy, split_batches, strategy_for
from .search import Search

__all__ = [
    "Allocation", "AllocationProblem", "Search", "allocate", "candidate_masks", "register_strategy", "split_batches",
    "strategy_for",
]
