"""wisparse-compile: training-free activation sparsity as a torch.compile backend.

    plan = wsc.calibrate(model, batches, wsc.SparsityConfig(sparsity=0.5, method="wina"))
    wsc.attach(model, plan)
    fast = torch.compile(model, backend="wisparse")
    # or typed, with an Inductor mode: backend=wsc.WisparseBackend(mode="reduce-overhead", fuse_siblings=True)
    print(wsc.last_compile_report().summary())
"""

from __future__ import annotations

import logging

from .attach import attach, attached_plan, detach
from .backend import WisparseBackend, last_compile_report, wisparse_backend
from .calibrate import calibrate
from .config import BackendConfig, Greedy, QuantizeConfig, Sensitivity, SparsityConfig, Uniform
from .decoding import decode_compile_options
from .plan import PlanError, SparsityPlan
from .quant.model import Quantization, quantization_of
from .reference import masked_linears, measure_sparsity

__all__ = [
    "BackendConfig",
    "Greedy",
    "PlanError",
    "Quantization",
    "QuantizeConfig",
    "Sensitivity",
    "SparsityConfig",
    "SparsityPlan",
    "Uniform",
    "WisparseBackend",
    "attach",
    "attached_plan",
    "calibrate",
    "decode_compile_options",
    "detach",
    "last_compile_report",
    "masked_linears",
    "measure_sparsity",
    "quantization_of",
]
__version__ = "0.1.0"


def _register_backend() -> None:
    """Make backend="wisparse" work when the package is imported without being installed."""
    from torch._dynamo import list_backends
    from torch._dynamo.backends.registry import register_backend

    if "wisparse" not in list_backends(exclude_tags=()):
        register_backend(wisparse_backend, name="wisparse")


try:
    _register_backend()
except Exception as e:  # never fail the import over registration; the entry point may still work
    logging.getLogger(__name__).debug("could not register the wisparse backend: %s", e)
