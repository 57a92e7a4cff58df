"""Does WINA's score do what it claims, linear by linear? Output error of |x| vs |x| * ||W[:, i]||.

    PYTHONPATH=$PWD python benchmarks/criterion_error.py [--model smollm2] [--tokens 1024] [--sparsity 0.5]
    PYTHONPATH=$PWD python benchmarks/criterion_error.py --dry-run   # a tiny random Llama, seconds

For every linear of the model (the lm_head aside), its inputs on calibration text are masked at the
given sparsity by each score, and the relative output error ||W x - W (m * x)||^2 / ||W x||^2 is
measured; two mask rules: per-token top-k (WINA's released evaluation) and one threshold per linear
fit on the first half of the tokens (what a plan stores). Both methods get the same sparsity in
every linear, so the allocation plays no part. Writes ``results/criterion_error/<machine>/<date>.json``
(records: per mask rule and projection name, in how many layers WINA's error is lower and the mean
errors; then one record per linear) and the markdown table beside it.
"""

from __future__ import annotations

import argparse
import collections

import torch
from tqdm import tqdm

from benchmarks.harness import out_dir_for, write_result
from wisparse_compile.data import load_causal_lm, split_articles, token_windows, wikipedia_articles


def linear_inputs(model, batches) -> dict[str, torch.Tensor]:
    """Each nn.Linear's inputs over the batches, [tokens, in] (lm_head excluded: no method plans it)."""
    head = model.get_output_embeddings()
    inputs: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    hooks = [
        module.register_forward_pre_hook(lambda m, a, n=name: inputs[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    ]
    try:
        with torch.no_grad():
            for ids in tqdm(batches, desc="collecting inputs"):
                model(ids)
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat(xs) for name, xs in inputs.items()}


def keep_mask(score: torch.Tensor, sparsity: float, rule: str) -> torch.Tensor:
    if rule == "topk":
        keep = score.shape[1] - int(round(sparsity * score.shape[1]))
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(keep, dim=1).indices, True)
    fit = score[: score.shape[0] // 2].flatten()
    return score > torch.quantile(fit.float(), sparsity).to(score.dtype)


def relative_errors(x: torch.Tensor, weight: torch.Tensor, sparsity: float, rule: str) -> dict[str, float]:
    x, w = x.double(), weight.double()
    y = x @ w.T
    scores = {"teal": x.abs(), "wina": x.abs() * w.norm(dim=0)}
    return {
        method: (((x * keep_mask(s, sparsity, rule)) @ w.T - y).pow(2).sum() / y.pow(2).sum()).item()
        for method, s in scores.items()
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--out-dir", default=None, help="default benchmarks/results (--dry-run: a temporary folder)")
    p.add_argument("--dry-run", action="store_true", help="a tiny random Llama and 128 tokens: checks the script, NOT figures")
    args = p.parse_args(argv)
    if args.dry_run:
        args.model, args.tokens = "random:llama", 128
    if not 0.0 < args.sparsity < 1.0:
        raise SystemExit(f"--sparsity must be in (0, 1), got {args.sparsity}")
    model, tok = load_causal_lm(args.model)
    calibration, _ = split_articles(wikipedia_articles())
    inputs = linear_inputs(model, token_windows(tok, calibration, min(256, args.tokens), max_tokens=args.tokens))
    modules = dict(model.named_modules())
    per_linear = {
        rule: {name: relative_errors(x, modules[name].weight, args.sparsity, rule) for name, x in tqdm(inputs.items(), desc=rule)}
        for rule in ("topk", "threshold")
    }
    summary: dict[str, dict[str, dict]] = {}
    for rule, errors in per_linear.items():
        groups: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
        for name, e in errors.items():
            groups[name.rsplit(".", 1)[-1]].append(e)
        summary[rule] = {
            kind: {
                "layers": len(es),
                "wina_lower": sum(e["wina"] < e["teal"] for e in es),
                "mean_teal": sum(e["teal"] for e in es) / len(es),
                "mean_wina": sum(e["wina"] for e in es) / len(es),
            }
            for kind, es in groups.items()
        }
    setup = {"model": args.model, "tokens": next(iter(inputs.values())).shape[0], "sparsity": args.sparsity,
             "text": "first half of the gensim Wikipedia articles (the calibration set)"}
    records = [{"kind": "projection", "rule": rule, "projection": kind, **r}
               for rule, kinds in summary.items() for kind, r in kinds.items()]
    records += [{"kind": "linear", "rule": rule, "linear": name, **e}
                for rule, errors in per_linear.items() for name, e in errors.items()]
    lines = [f"Per-linear output error at sparsity {args.sparsity} ({args.model})", "",
             "| mask rule | projection | WINA error lower in | mean rel. error, TEAL (abs x) | mean rel. error, WINA (abs x * column norm) |",
             "|---|---|---|---|---|"]
    for rule, kinds in summary.items():
        for kind, r in kinds.items():
            lines.append(f"| {rule} | {kind} | {r['wina_lower']}/{r['layers']} | {r['mean_teal']:.4f} | {r['mean_wina']:.4f} |")
    table = "\n".join(lines)
    result = write_result("criterion_error", setup, records, table,
                          out_dir=out_dir_for(args.out_dir, args.dry_run, "criterion_error"), dry_run=args.dry_run)
    print(table)
    return result

if __name__ == "__main__":
    main()
