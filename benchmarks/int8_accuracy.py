"""Accuracy of 8- and 4-bit weights: fp32 dense, int8/int4 dense, and int8/int4 + sparsity (teal / wina / wisparse plans).

Same setup as ``accuracy.py`` (SmolLM2-135M-Instruct; calibration on the first half of gensim's
Wikipedia articles, perplexity on the second half, 1024-token windows). Plans are calibrated on the
float model, as a user would, then ``attach(model, plan, weights="int8")`` quantizes the planned
linears and the output head (symmetric int8 per output channel, ``wisparse_compile/quant/``;
with ``weights="int4"``: 4-bit codes -8..7, one scale per input channel and 32 outputs),
and perplexity is measured eagerly under ``masked_linears`` (every planned linear masked; the
quantized weights compute with their dequantized values, the math the compiled ops run). "int8
dense" / "int4 dense" quantize every decoder linear and the head without masking ("int4 dense,
float head": the decoder linears only). A plan is
calibrated once per method and serves both formats. Results are checkpointed per row in
``results/int8_accuracy/<machine>/<date>.json`` (a rerun continues the newest result of the same
setup, skipping what is there) with the markdown table beside it.

    PYTHONPATH=. python benchmarks/int8_accuracy.py --threads 1        # teal/wina ~3 min, wisparse ~11 min per row
    PYTHONPATH=. python benchmarks/int8_accuracy.py --weights int4 --methods teal   # only some rows
    PYTHONPATH=. python benchmarks/int8_accuracy.py --dry-run          # random tiny model, a check of the script
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from benchmarks.harness import latest_result, machine_id, out_dir_for, random_llama, write_result
from wisparse_compile import SparsityConfig, attach, calibrate, detach, masked_linears
from wisparse_compile.config import METHODS, QuantizeConfig
from wisparse_compile.eval import evaluate, overall_sparsity
from wisparse_compile.model_structure import decoder_layer_prefixes, find_weight
from wisparse_compile.quant.model import dequantize_model, quantize_model
from wisparse_compile.quant.primitives import WEIGHT_FORMATS

log = logging.getLogger("int8_accuracy")
#: int8 alone should stay within this relative perplexity increase over fp32 (the issue's target).
INT8_TARGET = 0.01
#: Formats that also get a dense row with the output head left float (``QuantizeConfig(head=False)``).
FLOAT_HEAD_ROWS = ("int4",)
#: What each format stores (the record's ``setup["quantization"]``).
QUANTIZATION = {
    "int8": "symmetric int8 per output channel, planned linears + lm_head (own copy if tied)",
    "int4": "4-bit codes -8..7, one fp32 scale per input channel and 32 outputs (least-squares among max|W|/6..9), planned linears + lm_head",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model folder, .gguf file or 'smollm2'")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--weights", nargs="+", default=list(WEIGHT_FORMATS), choices=WEIGHT_FORMATS,
                   help="the quantized formats to measure (rows of other formats already recorded are kept)")
    p.add_argument("--calibration-batches", type=int, default=16)
    p.add_argument("--calibration-length", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--out-dir", default=None, help="default benchmarks/results (--dry-run: a temporary folder)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dry-run", "--quick", dest="dry_run", action="store_true",
                   help="a tiny random Llama and random tokens: checks the script, NOT figures")
    return p.parse_args(argv)


def decoder_linears(model: torch.nn.Module) -> list[str]:
    """Every linear a plan would cover (the decoder layers'), found as calibration finds them."""
    prefixes = tuple(decoder_layer_prefixes(model))
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefixes)]


def markdown_table(results: dict, sparsity: float) -> str:
    fp = results.get("fp32 dense", {}).get("perplexity")
    lines = ["| weights | plan | perplexity | vs fp32 dense | achieved sparsity |", "|---|---|---|---|---|"]
    for key, r in results.items():
        vs = f"{100 * (r['perplexity'] / fp - 1):+.2f}%" if fp else "-"
        ach = f"{r['achieved_sparsity']:.3f}" if r.get("achieved_sparsity") is not None else "-"
        lines.append(f"| {r['weights']} | {r['plan']} | {r['perplexity']:.3f} | {vs} | {ach} |")
    return "\n".join(lines) + "\n"


def _data(args: argparse.Namespace):
    if args.dry_run:
        g = torch.Generator().manual_seed(0)
        model = random_llama("tiny")
        calib = [torch.randint(0, 256, (1, 32), generator=g) for _ in range(2)]
        windows = [torch.randint(0, 256, (1, 64), generator=g) for _ in range(2)]
        return model, calib, windows
    from wisparse_compile.data import load_causal_lm, split_articles, token_windows, wikipedia_articles

    model, tokenizer = load_causal_lm(args.model)
    calib_texts, eval_texts = split_articles(wikipedia_articles())
    calib = token_windows(tokenizer, calib_texts, args.calibration_length, args.calibration_batches * args.calibration_length)
    windows = token_windows(tokenizer, eval_texts, args.window, args.eval_tokens)
    return model, calib, windows


def _same_measurement(old: dict | None, new: dict) -> bool:
    """Whether recorded rows were measured as ``new`` would measure them: the same setup, and each
    format described alike (a format added since keeps the rows of the others)."""
    if not isinstance(old, dict):
        return False
    strip = lambda s: {k: v for k, v in s.items() if k != "quantization"}  # noqa: E731
    quant = old.get("quantization")
    quant = {"int8": quant} if isinstance(quant, str) else (quant or {})  # records from before int4
    return strip(old) == strip(new) and all(new["quantization"].get(f) == q for f, q in quant.items())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dry_run:
        args.methods = ["teal", "wisparse"]
    out_dir = out_dir_for(args.out_dir, args.dry_run, "int8_accuracy")
    machine = "dry-run" if args.dry_run else machine_id()
    setup = {
        "model": "tiny random llama" if args.dry_run else args.model, "sparsity": args.sparsity,
        "calibration_batches": args.calibration_batches, "calibration_length": args.calibration_length,
        "eval_tokens": args.eval_tokens, "window": args.window, "quick": args.dry_run,
        "quantization": dict(QUANTIZATION),
    }
    record = {"setup": setup, "results": {}}
    old = latest_result(out_dir, "int8_accuracy", machine)
    if old and _same_measurement(old.get("setup"), setup):
        record["results"] = {r["key"]: {k: v for k, v in r.items() if k != "key"} for r in old["records"]}

    def save() -> dict:
        table = markdown_table(record["results"], args.sparsity)
        records = [{"key": key, **r} for key, r in record["results"].items()]
        return write_result("int8_accuracy", setup, records, table, out_dir=out_dir, machine=machine, dry_run=args.dry_run)

    model, calib, windows = _data(args)
    results = record["results"]
    if "fp32 dense" not in results:
        rep = evaluate(model, windows, desc="fp32 dense")
        results["fp32 dense"] = {**rep.to_dict(), "weights": "fp32", "plan": "dense", "achieved_sparsity": None}
        save()
    plans: dict = {}  # method -> plan, calibrated once on the float model for every format
    for fmt in args.weights:
        dense_key = f"{fmt} dense"
        if dense_key not in results:
            summary = quantize_model(model, decoder_linears(model), QuantizeConfig(weights=fmt))
            try:
                rep = evaluate(model, windows, desc=dense_key)
            finally:
                dequantize_model(model)
            results[dense_key] = {**rep.to_dict(), "weights": fmt, "plan": "dense", "achieved_sparsity": None,
                                  "quantized": len(summary.quantized), "head": summary.head, "untied": summary.untied}
            fp = results["fp32 dense"]["perplexity"]
            log.info("%s: ppl %.3f vs fp32 %.3f (%+.2f%%%s)", dense_key, rep.perplexity, fp, 100 * (rep.perplexity / fp - 1),
                     f"; target within {100 * INT8_TARGET:.0f}%" if fmt == "int8" else "")
            save()
        head_key = f"{fmt} dense, float head"
        if fmt in FLOAT_HEAD_ROWS and head_key not in results:  # how much of the loss is the head's
            summary = quantize_model(model, decoder_linears(model), QuantizeConfig(weights=fmt, head=False))
            try:
                rep = evaluate(model, windows, desc=head_key)
            finally:
                dequantize_model(model)
            results[head_key] = {**rep.to_dict(), "weights": f"{fmt}, head float", "plan": "dense", "achieved_sparsity": None,
                                 "quantized": len(summary.quantized), "head": summary.head, "untied": summary.untied}
            save()
        for method in args.methods:
            key = f"{fmt} + {method}@{args.sparsity:g}"
            if key in results:
                continue
            t0 = time.perf_counter()
            if method not in plans:
                config = SparsityConfig(sparsity=args.sparsity, method=method)
                plans[method] = calibrate(model, calib, config)  # on the float model
            plan = plans[method]
            attach(model, plan, weights=fmt)
            mode = masked_linears()
            try:
                rep = evaluate(model, windows, context=lambda: mode, desc=key)
            finally:
                detach(model)
            assert all(type(find_weight(model, n)[1]) is torch.nn.Parameter for n in plan.names)  # detach restored float
            results[key] = {
                **rep.to_dict(), "weights": fmt, "plan": f"{method} {args.sparsity:g}",
                "achieved_sparsity": round(overall_sparsity(mode.sparsity(), plan.shapes), 4),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            save()
    result = save()
    print(markdown_table(record["results"], args.sparsity))
    return result

if __name__ == "__main__":
    main()
