"""Two revisions side by side: the quickstart's perplexity, agreement and decode speed-up, run alternately.

    PYTHONPATH=. python benchmarks/compare_revisions.py --base 5f6ef3c --methods teal wina --runs 2
    PYTHONPATH=. python benchmarks/compare_revisions.py --dry-run     # a tiny stand-in, about a minute

A refactor that keeps behaviour keeps the demo's figures. Each revision runs its own
``examples/quickstart.py`` (SmolLM2-135M: calibrate, held-out perplexity dense vs sparse, greedy
decode dense Inductor vs ``backend="wisparse"`` interleaved round by round) from its own tree:
``--base`` (and ``--head``, if given) is checked out into a temporary git worktree, removed
afterwards (also on Ctrl-C); without ``--head`` the head side is this checkout as it is, uncommitted
changes included. Runs alternate base, head, base, head, ... so that load from other processes hits
both sides alike. Each child prints where it imported ``wisparse_compile`` from; a child that
imported the other tree's package is an error, not a figure.

Perplexity, next-token agreement and the greedy tokens are deterministic: they match or they do not.
The decode speed-up (sparse over dense, measured inside each run) is compared as median and range
over runs. Writes ``results/compare_revisions/<machine>/<date>.json`` and the table beside it.
``--dry-run``: base = HEAD, head = this checkout, and a stand-in for the quickstart (a tiny random
Llama, the same printed table): it checks the plumbing, its numbers are NOT figures.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)

#: The quickstart's printed lines this benchmark reads (the same in every revision since the quickstart landed).
PATTERNS = {
    "perplexity": re.compile(r"perplexity \(held-out\)\s+([\d.]+)\s+([\d.]+)"),
    "tokens_per_s": re.compile(r"decode tokens/s\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x"),
    "achieved": re.compile(r"achieved on held-out text: ([\d.]+)%"),
    "agreement": re.compile(r"next-token agreement with dense on held-out text: ([\d.]+)%; greedy decode: (\d+) of (\d+)"),
    "sparse_decode": re.compile(r"^sparse decode:\s+(.*)$", re.M),
    "package": re.compile(r"^wisparse_compile imported from (.*)$", re.M),
}
#: Prints where the child's ``wisparse_compile`` comes from, then runs the script as ``__main__``.
CHILD = (
    "import runpy, sys, wisparse_compile; print('wisparse_compile imported from', wisparse_compile.__file__, flush=True); "
    "script = sys.argv[1]; sys.argv = sys.argv[1:]; runpy.run_path(script, run_name='__main__')"
)


@contextlib.contextmanager
def checked_out(revision: str, where: Path) -> Iterator[Path]:
    """``revision`` in a temporary git worktree under ``where``; removed on the way out, whatever happens."""
    tree = where / re.sub(r"[^A-Za-z0-9._-]+", "_", revision)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), revision],
                   check=True, capture_output=True, text=True)
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)


def parse_quickstart(output: str, tree: Path) -> dict:
    """The figures in one quickstart run's output; raises if a line is missing or the package came from elsewhere."""
    found = {key: pattern.search(output) for key, pattern in PATTERNS.items()}
    missing = [key for key, match in found.items() if match is None]
    if missing:
        raise RuntimeError(f"the quickstart's output lacks {missing}; its last lines:\n{output[-2000:]}")
    package = Path(found["package"].group(1)).resolve()
    if tree.resolve() not in package.parents:
        raise RuntimeError(f"the run in {tree} imported wisparse_compile from {package}: set up the environment so "
                           "that PYTHONPATH decides (an editable install that shadows it compares a tree with itself)")
    dense_tps, sparse_tps, _ = (float(v) for v in found["tokens_per_s"].groups())
    return {
        "dense_perplexity": float(found["perplexity"].group(1)), "sparse_perplexity": float(found["perplexity"].group(2)),
        "dense_tokens_per_s": dense_tps, "sparse_tokens_per_s": sparse_tps, "speedup": sparse_tps / dense_tps,
        "achieved_sparsity": float(found["achieved"].group(1)) / 100,
        "top1_agreement": float(found["agreement"].group(1)) / 100,
        "greedy_tokens_identical": int(found["agreement"].group(2)), "greedy_tokens": int(found["agreement"].group(3)),
        "sparse_decode": found["sparse_decode"].group(1),
    }


def run_quickstart(tree: Path, script: str, args: list[str]) -> dict:
    """One run of ``script`` from ``tree``, with that tree first on the import path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.run([sys.executable, "-c", CHILD, script, *args], cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{script} failed in {tree} (exit {proc.returncode}):\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    return parse_quickstart(proc.stdout, tree)


def compare(runs: dict[str, list[dict]]) -> dict:
    """One method's record: deterministic figures side by side (and whether they match), speed-ups as median/range."""
    record: dict = {}
    for side, side_runs in runs.items():
        speedups = [r["speedup"] for r in side_runs]
        first = side_runs[0]
        record[side] = {
            **{k: first[k] for k in ("dense_perplexity", "sparse_perplexity", "achieved_sparsity", "top1_agreement",
                                     "greedy_tokens_identical", "greedy_tokens", "sparse_decode")},
            "speedup": statistics.median(speedups), "speedup_range": [min(speedups), max(speedups)],
            "dense_tokens_per_s": statistics.median(r["dense_tokens_per_s"] for r in side_runs),
            "sparse_tokens_per_s": statistics.median(r["sparse_tokens_per_s"] for r in side_runs),
            "runs": side_runs,
        }
    base, head = record["base"], record["head"]
    record["same_quality"] = all(base[k] == head[k] for k in ("dense_perplexity", "sparse_perplexity", "top1_agreement",
                                                              "greedy_tokens_identical", "sparse_decode"))
    record["speedup_ratio"] = head["speedup"] / base["speedup"]
    return record


def table(records: dict[str, dict], labels: dict[str, str]) -> str:
    lines = [f"base = {labels['base']}, head = {labels['head']}", "",
             "| method | side | ppl dense | ppl sparse | achieved | top-1 agree | greedy same | speed-up (median, range) |",
             "|---|---|---|---|---|---|---|---|"]
    for method, record in records.items():
        for side in ("base", "head"):
            r = record[side]
            lo, hi = r["speedup_range"]
            lines.append(f"| {method} | {side} | {r['dense_perplexity']:.2f} | {r['sparse_perplexity']:.2f} | "
                         f"{r['achieved_sparsity']:.1%} | {r['top1_agreement']:.1%} | {r['greedy_tokens_identical']}/"
                         f"{r['greedy_tokens']} | {r['speedup']:.2f}x ({lo:.2f}-{hi:.2f}, {len(r['runs'])} runs) |")
        lines.append(f"| {method} | head/base | {'same' if record['same_quality'] else 'DIFFERENT'} quality | | | | | "
                     f"{record['speedup_ratio']:.3f} |")
    return "\n".join(lines)


def dry_run_stand_in() -> None:
    """The quickstart's table for a tiny random Llama (what ``--dry-run`` runs in each tree): plumbing, not figures."""
    import copy

    import wisparse_compile as wsc
    from benchmarks.harness import random_batches, random_llama
    from wisparse_compile.decoding import GreedyDecoder, interleaved_tokens_per_s, median
    from wisparse_compile.eval import evaluate, overall_sparsity

    model = random_llama("tiny")
    windows = random_batches(model.config.vocab_size, 4, 32)
    plan = wsc.calibrate(model, windows[:2], wsc.SparsityConfig(sparsity=0.5, method="teal"))
    dense_model = copy.deepcopy(model)
    prompt, new_tokens = windows[2][:, :8], 4
    decoders = {"dense": GreedyDecoder(dense_model, "inductor", prompt.shape[1], new_tokens, prompt=prompt),
                "sparse": GreedyDecoder(model, "wisparse", prompt.shape[1], new_tokens, prompt=prompt)}
    dense_quality = evaluate(dense_model, windows[2:], desc="dense perplexity")
    wsc.attach(model, plan)
    sparse_quality = evaluate(model, windows[2:], dense=dense_model, context=wsc.masked_linears, desc="sparse perplexity")
    achieved = overall_sparsity(wsc.measure_sparsity(model, windows[2:3]), plan.shapes)
    for decoder in decoders.values():
        decoder.tokens_per_s(2)
    samples = interleaved_tokens_per_s(decoders, 1)
    dense_tps, sparse_tps = median(samples["dense"]), median(samples["sparse"])
    same = sum(a == b for a, b in zip(decoders["dense"].last_tokens, decoders["sparse"].last_tokens))
    print(f"tiny, teal plan at 50% (achieved on held-out text: {achieved:.1%})")
    print(f"{'perplexity (held-out)':24}{dense_quality.perplexity:>10.2f}{sparse_quality.perplexity:>10.2f}")
    print(f"{'decode tokens/s':24}{dense_tps:>10.1f}{sparse_tps:>10.1f}{sparse_tps / dense_tps:>8.2f}x")
    print(f"next-token agreement with dense on held-out text: {sparse_quality.top1_agreement:.1%}; "
          f"greedy decode: {same} of {new_tokens} tokens identical to dense")
    print(f"sparse decode:  {decoders['sparse'].last_tokens!r}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="the revision to compare against (a commit, tag or branch)")
    parser.add_argument("--head", default=None, help="the revision compared; default: this checkout as it is")
    parser.add_argument("--methods", nargs="+", default=["teal", "wina"], choices=["teal", "wina", "wisparse"])
    parser.add_argument("--runs", type=int, default=2, help="quickstart runs per side and method (alternating)")
    parser.add_argument("--quickstart-args", nargs=argparse.REMAINDER, default=[],
                        help="passed to each quickstart run (e.g. --rounds 5 --new-tokens 64); must come last")
    parser.add_argument("--dry-run", action="store_true", help="base = HEAD, a tiny stand-in for the quickstart: NOT figures")
    parser.add_argument("--stand-in", action="store_true", help=argparse.SUPPRESS)  # what --dry-run runs in each tree
    parser.add_argument("--out-dir", default=None, help="default benchmarks/results (--dry-run: a temporary folder)")
    args = parser.parse_args(argv)
    if args.stand_in:
        dry_run_stand_in()
        return {}
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from benchmarks.harness import out_dir_for, write_result

    if args.dry_run:
        args.base, args.head, args.methods, args.runs = "HEAD", None, ["teal"], 1
    if not args.base:
        parser.error("--base REVISION is required (the revision before the change you measure), or --dry-run")
    script = str(Path(__file__).resolve()) if args.dry_run else "examples/quickstart.py"
    child_args = ["--stand-in"] if args.dry_run else args.quickstart_args
    labels = {"base": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.base], check=True,
                                     capture_output=True, text=True).stdout.strip(),
              "head": args.head or "this checkout"}
    records = {}
    with tempfile.TemporaryDirectory(prefix="compare-revisions-") as tmp, contextlib.ExitStack() as stack:
        trees = {"base": stack.enter_context(checked_out(args.base, Path(tmp))),
                 "head": stack.enter_context(checked_out(args.head, Path(tmp))) if args.head else ROOT}
        for method in args.methods:
            runs: dict[str, list[dict]] = {"base": [], "head": []}
            for i in range(args.runs):
                for side, tree in trees.items():
                    method_args = [] if args.dry_run else ["--method", method]
                    runs[side].append(run_quickstart(tree, script, [*method_args, *child_args]))
                    log.info("%s run %d/%d %s: speed-up %.2fx, sparse ppl %.2f", method, i + 1, args.runs, side,
                             runs[side][-1]["speedup"], runs[side][-1]["sparse_perplexity"])
            records[method] = compare(runs)
    text = table(records, labels)
    print(text)
    setup = {"base": labels["base"], "head": labels["head"], "methods": args.methods, "runs": args.runs,
             "quickstart_args": child_args}
    return write_result("compare_revisions", setup, [{"method": m, **r} for m, r in records.items()], text,
                        out_dir=out_dir_for(args.out_dir, args.dry_run, "compare_revisions"), dry_run=args.dry_run)


if __name__ == "__main__":
    main()
