"""Accuracy table: dense and teal / wina / wisparse at several sparsities on SmolLM2, on held-out
Wikipedia and on text of other kinds.

Calibrates on the first half of the gensim Wikipedia articles only (by default one 256-token window from
the start of each of its first 16 articles), and evaluates perplexity with
every planned linear masked eagerly (``masked_linears``, the math the compiled model runs) on the
second half of the articles and on the other domains of ``wisparse_compile.data.DOMAINS`` (news articles,
Usenet posts, Python's reference documentation), none of which calibration sees. The achieved
sparsity is measured on the held-out Wikipedia tokens. Results are checkpointed per configuration
in ``results/accuracy/<machine>/<date>.json`` (a rerun continues the newest result of the same
setup, skipping what is there); after each configuration the markdown table and the plot beside it
are rewritten.

    PYTHONPATH=. python benchmarks/accuracy.py --threads 1 --sparsities 0.4 0.5 0.6
    PYTHONPATH=. python benchmarks/accuracy.py --dry-run     # a tiny random model, a minute
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from benchmarks.harness import latest_result, machine_id, out_dir_for, write_result
from wisparse_compile import SparsityConfig, attach, calibrate, detach, masked_linears
from wisparse_compile.allocation.search import Search
from wisparse_compile.config import METHODS
from wisparse_compile.data import DOMAINS, domain_texts, load_causal_lm, split_articles, token_windows, wikipedia_articles
from wisparse_compile.eval import evaluate, overall_sparsity

log = logging.getLogger("accuracy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model folder, .gguf file or 'smollm2'")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.4, 0.5, 0.6])
    p.add_argument("--domains", nargs="+", default=["wikipedia", *DOMAINS], choices=["wikipedia", *DOMAINS],
                   help="evaluation text (wikipedia: the held-out half of the articles)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--calibration-batches", type=int, default=16,
                   help="256-token windows; the search (--across-blocks free) holds the last "
                        "validation tokens out of its statistics")
    p.add_argument("--calibration-length", type=int, default=256)
    p.add_argument("--calibration-windows", choices=["leading", "spread"], default="spread",
                   help="leading: the first tokens of the calibration half (its first article, for 16 x 256); "
                        "spread: one window from the start of each of its first --calibration-batches articles")
    p.add_argument("--eval-tokens", type=int, default=4096, help="per domain")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--across-blocks", choices=("sensitivity", "free"), default="sensitivity",
                   help="wisparse's split across blocks: by output sensitivity, or the free search that lost (Search)")
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--generations", type=int, default=5)
    p.add_argument("--validation-tokens", type=int, default=1024)
    p.add_argument("--refinement-tokens", type=int, default=512)
    p.add_argument("--refinement-step", type=float, default=0.1)
    p.add_argument("--out-dir", default=None, help="default benchmarks/results (--dry-run: a temporary folder)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--dry-run", action="store_true",
                   help="a tiny random Llama, few tokens, results to a temporary folder: checks the script runs")
    args = p.parse_args(argv)
    if args.dry_run:
        args.model, args.sparsities, args.methods = "random:llama", [0.5], ["teal", "wisparse"]
        args.calibration_batches, args.calibration_length, args.eval_tokens, args.window = 8, 32, 128, 64
        args.validation_tokens, args.refinement_tokens = 64, 64
        args.population, args.generations = 3, 1
    args.out = out_dir_for(args.out_dir, args.dry_run, "accuracy")
    args.machine = "dry-run" if args.dry_run else machine_id()
    return args


def _rise(r: dict, dense: dict, domain: str) -> float | None:
    ppl = r.get("perplexity", {}).get(domain)
    base = dense.get("perplexity", {}).get(domain)
    return None if ppl is None or not base else ppl / base - 1


def markdown_table(results: dict) -> str:
    """Rows: each sparsity's methods; columns: perplexity per domain (rise over dense in brackets),
    the achieved sparsity, and per domain the ratio of wisparse's rise to teal's."""
    dense = results.get("dense", {})
    domains = list(dense.get("perplexity", {}))
    sparsities = sorted({r["target"] for k, r in results.items() if k != "dense"})
    methods = [m for m in METHODS if any(r.get("method") == m for r in results.values())]
    lines = [
        "Perplexity per text domain, in brackets the rise over dense; calibrated on Wikipedia only (the other "
        "domains are never seen). Achieved: sparsity measured on the held-out Wikipedia tokens with every "
        "planned linear masked.",
        "",
        "| sparsity | method | " + " | ".join(domains) + " | achieved |",
        "|---" * (len(domains) + 3) + "|",
        "| 0 | dense | " + " | ".join(f"{dense['perplexity'][d]:.2f}" for d in domains) + " | 0 |",
    ]
    for s in sparsities:
        for m in methods:
            r = results.get(f"{m}@{s:g}")
            if not r:
                continue
            cells = []
            for d in domains:
                rise = _rise(r, dense, d)
                cells.append("-" if rise is None else f"{r['perplexity'][d]:.2f} ({100 * rise:+.1f}%)")
            lines.append(f"| {s:g} | {m} | " + " | ".join(cells) + f" | {r['achieved_sparsity']:.3f} |")
        teal, ws = results.get(f"teal@{s:g}"), results.get(f"wisparse@{s:g}")
        if teal and ws:
            ratios = []
            for d in domains:
                a, b = _rise(ws, dense, d), _rise(teal, dense, d)
                ratios.append("-" if a is None or not b else f"{a / b:.2f}x")
            lines.append(f"| {s:g} | wisparse rise / teal rise | " + " | ".join(ratios) + " | |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(results.get("dense", {}).get("perplexity", {}))
    fig, axes = plt.subplots(1, len(domains), figsize=(4 * len(domains), 3.6), squeeze=False)
    for ax, d in zip(axes[0], domains):
        for m in METHODS:
            pts = sorted((r["achieved_sparsity"], r["perplexity"][d]) for r in results.values()
                         if r.get("method") == m and d in r.get("perplexity", {}))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        ax.axhline(results["dense"]["perplexity"][d], color="gray", linestyle="--", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("achieved sparsity")
        ax.set_title(d + (" (held out)" if d == "wikipedia" else " (unseen domain)"))
    axes[0][0].set_ylabel("perplexity")
    axes[0][-1].legend()
    fig.suptitle("SmolLM2-135M-Instruct, calibrated on Wikipedia")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_outputs(record: dict, args: argparse.Namespace) -> dict:
    """Checkpoint: the result file (one record per configuration), its table, and the plot beside them."""
    table = markdown_table(record["results"])
    records = [{"key": key, **r} for key, r in record["results"].items()]
    result = write_result("accuracy", record["setup"], records, table, out_dir=args.out, machine=args.machine,
                          dry_run=args.dry_run)
    if len(record["results"]) > 1:
        plot(record["results"], Path(result["path"]).with_suffix(".png"))
    return result


def calibration_windows(tokenizer, texts: list[str], args: argparse.Namespace) -> list[torch.Tensor]:
    """The calibration batches: ``--calibration-batches`` windows of ``--calibration-length`` tokens."""
    length, count = args.calibration_length, args.calibration_batches
    if args.calibration_windows == "leading":
        return token_windows(tokenizer, texts, length, count * length)
    windows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            windows.append(torch.tensor(ids[:length]).unsqueeze(0))
        if len(windows) == count:
            break
    if len(windows) < count:
        raise ValueError(f"--calibration-windows spread needs {count} articles of {length}+ tokens, found {len(windows)}")
    return windows


def make_setup(args: argparse.Namespace) -> dict:
    """What a result depends on: a rerun resumes only results of the same setup."""
    return {
        "model": args.model, "calibration": "first half of the gensim 4.4.0 Wikipedia articles (>= 2000 chars)",
        "evaluation": {"wikipedia": "second half of those articles", "news": "Lee corpus (gensim test data)",
                       "newsgroups": "mini_newsgroup, headers dropped (gensim test data)",
                       "python-docs": "pydoc_data.topics (Python's reference docs)"},
        "domains": args.domains, "calibration_batches": args.calibration_batches,
        "calibration_windows": args.calibration_windows,
        "calibration_length": args.calibration_length, "eval_tokens_per_domain": args.eval_tokens, "window": args.window,
        "across_blocks": args.across_blocks, "population": args.population, "generations": args.generations,
        "validation_tokens": args.validation_tokens,
        "refinement_tokens": args.refinement_tokens, "refinement_step": args.refinement_step,
        "masking": "eager masked_linears, every planned linear", "torch": torch.__version__, "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = make_setup(args)
    record = {"setup": setup, "results": {}}
    old = latest_result(args.out, "accuracy", args.machine)
    ignore = {"torch": None, "threads": None}
    if old and old["setup"] | ignore == setup | ignore:
        record["results"] = {r["key"]: {k: v for k, v in r.items() if k != "key"} for r in old["records"]}
        log.info("resuming: %d configurations already done", len(record["results"]))

    model, tokenizer = load_causal_lm(args.model)
    calib_texts, eval_texts = split_articles(wikipedia_articles())
    calib = calibration_windows(tokenizer, calib_texts, args)
    texts = {d: eval_texts if d == "wikipedia" else domain_texts(d) for d in args.domains}
    windows = {d: token_windows(tokenizer, t, args.window, args.eval_tokens) for d, t in texts.items()}
    log.info("calibration %d x %d tokens; evaluation %s", len(calib), args.calibration_length,
             {d: f"{len(w)} x {args.window}" for d, w in windows.items()})

    if "dense" not in record["results"]:
        t0 = time.perf_counter()
        reps = {d: evaluate(model, w, desc=f"dense {d}") for d, w in windows.items()}
        record["results"]["dense"] = {"perplexity": {d: r.perplexity for d, r in reps.items()},
                                      "tokens": {d: r.tokens for d, r in reps.items()},
                                      "target": 0.0, "achieved_sparsity": 0.0,
                                      "eval_seconds": round(time.perf_counter() - t0, 1)}
        write_outputs(record, args)
    dense = record["results"]["dense"]["perplexity"]
    log.info("dense perplexity %s", {d: round(p, 3) for d, p in dense.items()})

    for s in args.sparsities:
        for m in args.methods:
            key = f"{m}@{s:g}"
            if key in record["results"]:
                continue
            search = Search(population=args.population, generations=args.generations, validation_tokens=args.validation_tokens)
            config = SparsityConfig(sparsity=s, method=m, allocation=search if m == "wisparse" and args.across_blocks == "free" else None,
                                    refinement_tokens=args.refinement_tokens, refinement_step=args.refinement_step)
            t0 = time.perf_counter()
            plan = calibrate(model, calib, config)
            t1 = time.perf_counter()
            attach(model, plan, input_major=False)
            reps, achieved = {}, None
            try:
                for d, w in windows.items():
                    mode = masked_linears()
                    reps[d] = evaluate(model, w, context=lambda: mode, desc=f"{key} {d}")
                    if achieved is None:  # the first domain (held-out Wikipedia by default)
                        achieved = overall_sparsity(mode.sparsity(), plan.shapes)
            finally:
                detach(model)
            allocation = plan.stats.get("allocation", {})
            search = allocation.get("search", {})
            record["results"][key] = {
                "method": m, "target": s, "achieved_sparsity": round(achieved, 4),
                "perplexity": {d: r.perplexity for d, r in reps.items()},
                "increase_over_dense": {d: round(r.perplexity / dense[d] - 1, 4) for d, r in reps.items()},
                "calibration_seconds": round(t1 - t0, 1), "eval_seconds": round(time.perf_counter() - t1, 1),
                "allocation": {k: v for k, v in allocation.items() if k in ("kind", "block_sparsities")}
                | ({"search": {k: search[k] for k in ("profile", "best_fitness", "uniform_fitness", "coefficients",
                                                       "finalists") if k in search}} if search else {}),
            }
            log.info("%s: ppl %s (achieved sparsity %.3f), calib %.0fs eval %.0fs", key,
                     {d: round(r.perplexity, 3) for d, r in reps.items()}, achieved, t1 - t0, time.perf_counter() - t1)
            write_outputs(record, args)
    result = write_outputs(record, args)
    print(markdown_table(record["results"]))
    return result

if __name__ == "__main__":
    main()
