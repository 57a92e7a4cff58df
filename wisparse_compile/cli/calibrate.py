"""``wisparse calibrate MODEL -o PLAN``: calibrate a sparsity plan on text and save it.

The plan file is written atomically: an interrupted run (Ctrl-C) leaves no partial plan.
"""

from __future__ import annotations

import argparse
import time

from ..config import METHODS
from .session import add_text_arguments, load_model, text_windows

NAME = "calibrate"
HELP = "calibrate a sparsity plan for a model on text and save it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a Hugging Face model folder, a .gguf file, smollm2, or random:<model_type>")
    parser.add_argument("-o", "--output", required=True, help="plan file to write (safetensors + JSON metadata)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="target fraction of input channels pruned (default 0.5)")
    parser.add_argument("--method", choices=METHODS, default="wisparse", help="allocation method (default wisparse)")
    parser.add_argument("--uniform", action="store_true", help="no allocation: every linear gets the target sparsity")
    add_text_arguments(parser, tokens=8192, length=512, part="calibration")
    parser.add_argument("--across-blocks", choices=("sensitivity", "free"), default=None,
                        help="wisparse: split across blocks by output sensitivity (default), or by a free search on KL "
                             "to dense (an experiment that lost: allocation.search.Search)")
    parser.add_argument("--refinement-tokens", type=int, default=None, help="calibration tokens of the within-block split")
    parser.add_argument("--validation-tokens", type=int, default=None, help="--across-blocks free: held-out tokens scoring the search")
    parser.add_argument("--population", type=int, default=None, help="--across-blocks free: search population")
    parser.add_argument("--generations", type=int, default=None, help="--across-blocks free: search generations")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from .. import SparsityConfig, Uniform, calibrate
    from ..allocation.search import Search

    search = {k: getattr(args, k) for k in ("validation_tokens", "population", "generations") if getattr(args, k) is not None}
    refinement = {"refinement_tokens": args.refinement_tokens} if args.refinement_tokens is not None else {}
    try:
        if search and (args.uniform or args.across_blocks != "free"):
            raise ValueError("--validation-tokens, --population and --generations set the search of --across-blocks free")
        allocation = Uniform() if args.uniform else Search(**search) if args.across_blocks == "free" else None
        config = SparsityConfig(sparsity=args.sparsity, method=args.method, allocation=allocation, seed=args.seed, **refinement)
    except ValueError as e:
        raise SystemExit(f"wisparse: {e}") from None
    model, tokenizer = load_model(args.model, tokenizer=True)
    batches = text_windows(tokenizer, args, "calibration")
    start = time.perf_counter()
    plan = calibrate(model, batches, config)
    plan.save(args.output)
    print(
        f"{plan.method} plan at sparsity {args.sparsity:g}: {len(plan.names)} linears, "
        f"{plan.stats['calibration_tokens']} calibration tokens, {time.perf_counter() - start:.1f} s -> {args.output}"
    )
    return 0
