"""Accuracy table: dense and teal / wina / wisparse at several sparsities on SmolLM2 + held-out Wikipedia.

Calibrates on the first half of the gensim Wikipedia articles, evaluates perplexity on the second
half with every planned linear masked eagerly (``masked_linears``, the math the compiled model
runs), and measures the achieved sparsity on those same held-out tokens. Results are checkpointed
per configuration in ``results/accuracy.json`` (a rerun skips what is there); at the end (and after
each configuration) the markdown table and the plot are rewritten.

    PYTHONPATH=. python benchmarks/accuracy.py --threads 1   # ~17 min per sparsity (teal 3, wina 3,
                                                             # wisparse 11) on 2 shared CPU cores
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from wisparse_compile import SparsityConfig, attach, calibrate, detach, masked_linears
from wisparse_compile.files import atomic_write_json, atomic_write_text
from wisparse_compile.config import METHODS
from wisparse_compile.cli.data import load_causal_lm, split_articles, token_windows, wikipedia_articles
from wisparse_compile.eval import evaluate, overall_sparsity

log = logging.getLogger("accuracy")
HERE = Path(__file__).resolve().parent
README_BEGIN, README_END = "<!-- accuracy-table:begin -->", "<!-- accuracy-table:end -->"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model folder, .gguf file or 'smollm2'")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.4, 0.5, 0.6, 0.7])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--calibration-batches", type=int, default=16)
    p.add_argument("--calibration-length", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--generations", type=int, default=5)
    p.add_argument("--validation-tokens", type=int, default=1024)
    p.add_argument("--refinement-tokens", type=int, default=256)
    p.add_argument("--refinement-step", type=float, default=0.1)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--readme", type=Path, default=HERE.parent / "README.md")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return p.parse_args()


def markdown_table(results: dict) -> str:
    dense = results.get("dense", {}).get("perplexity")
    sparsities = sorted({r["target"] for k, r in results.items() if k != "dense"})
    methods = [m for m in METHODS if any(r.get("method") == m for r in results.values())]
    head = "| method | " + " | ".join(f"{s:g}" for s in sparsities) + " |"
    lines = [
        f"Perplexity on held-out Wikipedia (dense: {dense:.2f}); in brackets the achieved sparsity, "
        "measured on the evaluation tokens with every planned linear masked." if dense else "",
        "", head, "|---" * (len(sparsities) + 1) + "|",
    ]
    for m in methods:
        cells = []
        for s in sparsities:
            r = results.get(f"{m}@{s:g}")
            cells.append(f"{r['perplexity']:.2f} ({r['achieved_sparsity']:.3f})" if r else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in METHODS:
        pts = sorted((r["achieved_sparsity"], r["perplexity"]) for r in results.values() if r.get("method") == m)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m)
    if "dense" in results:
        ax.axhline(results["dense"]["perplexity"], color="gray", linestyle="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("achieved sparsity (held-out tokens, all linears masked)")
    ax.set_ylabel("perplexity")
    ax.set_title("SmolLM2-135M-Instruct, held-out Wikipedia")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def update_readme(readme: Path, table: str) -> None:
    text = readme.read_text(encoding="utf-8")
    if README_BEGIN not in text:
        log.warning("%s has no %s marker: table not inserted", readme, README_BEGIN)
        return
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    atomic_write_text(readme, f"{head}{README_BEGIN}\n{table}{README_END}{tail}")


def write_outputs(record: dict, args: argparse.Namespace) -> str:
    atomic_write_json(args.out / "accuracy.json", record)
    table = markdown_table(record["results"])
    atomic_write_text(args.out / "accuracy.md", table)
    if len(record["results"]) > 1:
        plot(record["results"], args.out / "accuracy.png")
    return table


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "accuracy.json"
    setup = {
        "model": args.model, "calibration": "first half of the gensim 4.4.0 Wikipedia articles (>= 2000 chars)",
        "evaluation": "second half of those articles", "calibration_batches": args.calibration_batches,
        "calibration_length": args.calibration_length, "eval_tokens": args.eval_tokens, "window": args.window,
        "population": args.population, "generations": args.generations,
        "validation_tokens": args.validation_tokens, "refinement_tokens": args.refinement_tokens,
        "refinement_step": args.refinement_step, "masking": "eager masked_linears, every planned linear",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    record = {"setup": setup, "results": {}}
    if json_path.is_file():
        import json

        old = json.loads(json_path.read_text())
        if old.get("setup", {}) | {"torch": None, "threads": None} == setup | {"torch": None, "threads": None}:
            record["results"] = old["results"]
            log.info("resuming: %d configurations already done", len(record["results"]))

    model, tokenizer = load_causal_lm(args.model)
    calib_texts, eval_texts = split_articles(wikipedia_articles())
    calib = token_windows(tokenizer, calib_texts, args.calibration_length, args.calibration_batches * args.calibration_length)
    windows = token_windows(tokenizer, eval_texts, args.window, args.eval_tokens)
    log.info("calibration %d x %d tokens, evaluation %d x %d tokens", len(calib), args.calibration_length, len(windows), args.window)

    if "dense" not in record["results"]:
        t0 = time.perf_counter()
        rep = evaluate(model, windows, desc="dense")
        record["results"]["dense"] = {**rep.to_dict(), "target": 0.0, "achieved_sparsity": 0.0,
                                      "eval_seconds": round(time.perf_counter() - t0, 1)}
        write_outputs(record, args)
    dense_ppl = record["results"]["dense"]["perplexity"]
    log.info("dense perplexity %.3f", dense_ppl)

    for s in args.sparsities:
        for m in args.methods:
            key = f"{m}@{s:g}"
            if key in record["results"]:
                continue
            config = SparsityConfig(sparsity=s, method=m, population=args.population, generations=args.generations,
                                    validation_tokens=args.validation_tokens, refinement_tokens=args.refinement_tokens,
                                    refinement_step=args.refinement_step)
            t0 = time.perf_counter()
            plan = calibrate(model, calib, config)
            t1 = time.perf_counter()
            attach(model, plan, input_major=False)
            mode = masked_linears()
            try:
                rep = evaluate(model, windows, context=lambda: mode, desc=key)
            finally:
                detach(model)
            achieved = overall_sparsity(mode.sparsity(), plan.shapes)
            record["results"][key] = {
                **rep.to_dict(), "method": m, "target": s, "achieved_sparsity": round(achieved, 4),
                "increase_over_dense": round(rep.perplexity / dense_ppl - 1, 4),
                "calibration_seconds": round(t1 - t0, 1), "eval_seconds": round(time.perf_counter() - t1, 1),
                "allocation": {k: v for k, v in plan.stats.get("allocation", {}).items() if k in ("kind", "block_sparsities")}
                | ({"search_fitness": {k: plan.stats["allocation"]["search"][k] for k in ("best_fitness", "uniform_fitness")}}
                   if "search" in plan.stats.get("allocation", {}) else {}),
            }
            log.info("%s: ppl %.3f (achieved sparsity %.3f), calib %.0fs eval %.0fs", key, rep.perplexity, achieved, t1 - t0,
                     time.perf_counter() - t1)
            write_outputs(record, args)
    table = write_outputs(record, args)
    update_readme(args.readme, table)
    print(table)


if __name__ == "__main__":
    main()
