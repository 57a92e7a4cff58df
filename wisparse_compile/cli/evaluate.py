"""``wisparse eval MODEL [--plan PLAN]``: perplexity on text, dense and sparse, as a table and JSON.

Sparse runs eagerly under ``masked_linears`` (default) or compiled with the wisparse backend
(``--compile``); KL divergence and top-1 agreement compare it with the dense model on the same
windows. ``--json`` is written atomically.
"""

from __future__ import annotations

import argparse
import time

from ..files import atomic_write_json
from .session import add_text_arguments, load_model, text_windows

NAME = "eval"
HELP = "perplexity of a model (dense, and sparse with a plan) on text; table and JSON"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a Hugging Face model folder, a .gguf file, smollm2, or random:<model_type>")
    parser.add_argument("--plan", help="a plan saved by `wisparse calibrate` (without one: dense only)")
    add_text_arguments(parser, tokens=4096, length=1024, part="evaluation")
    parser.add_argument("--compile", action="store_true", help="run the sparse model compiled with backend='wisparse'")
    parser.add_argument("--json", help="also write the results here (atomically)")


def _row(name: str, report: dict, seconds: float) -> str:
    def fmt(key: str, spec: str) -> str:
        value = report.get(key)
        return "-" if value is None else format(value, spec)

    return (f"{name:<8} {report['tokens']:>7} {report['perplexity']:>10.3f} {fmt('kl_to_dense', '.4f'):>8} "
            f"{fmt('top1_agreement', '.3f'):>6} {fmt('achieved_sparsity', '.3f'):>9} {seconds:>7.1f}")


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import SparsityPlan, attach, masked_linears
    from ..eval import evaluate, overall_sparsity

    model, tokenizer = load_model(args.model, tokenizer=True)
    windows = text_windows(tokenizer, args, "evaluation")
    results: dict = {"model": args.model, "text": args.text, "window": args.length, "plan": args.plan,
                     "mode": "compiled" if args.compile else "eager", "results": {}}
    start = time.perf_counter()
    results["results"]["dense"] = {**evaluate(model, windows, desc="dense").to_dict(), "achieved_sparsity": 0.0}
    seconds = {"dense": time.perf_counter() - start}
    if args.plan:
        plan = SparsityPlan.load(args.plan)
        attach(model, plan)
        start = time.perf_counter()
        if args.compile:
            torch._dynamo.reset()
            sparse = evaluate(torch.compile(model, backend="wisparse"), windows, dense=model, desc="sparse (compiled)")
            achieved = None  # the compiled model does not count; eager mode measures it
        else:
            mode = masked_linears()
            sparse = evaluate(model, windows, dense=model, context=lambda: mode, desc="sparse (eager)")
            achieved = overall_sparsity(mode.sparsity(), plan.shapes)
        results["results"]["sparse"] = {**sparse.to_dict(), "method": plan.method, "achieved_sparsity": achieved}
        seconds["sparse"] = time.perf_counter() - start
    print(f"{'':<8} {'tokens':>7} {'perplexity':>10} {'KL':>8} {'top-1':>6} {'sparsity':>9} {'seconds':>7}")
    for name, report in results["results"].items():
        print(_row(name, report, seconds[name]))
    if args.json:
        atomic_write_json(args.json, results)
        print(f"results -> {args.json}")
    return 0
