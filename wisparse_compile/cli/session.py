"""What the debugging subcommands share: load a model, attach a plan, compile it into a debug dir."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..debug.dump import REPORT_JSON
from ..passes.decisions import CompileReport

log = logging.getLogger(__name__)

def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help="a Hugging Face model folder, a .gguf file, or random:<model_type> (a tiny random model of any transformers model_type) "
        "for a tiny randomly initialised model of that transformers architecture",
    )
    parser.add_argument("--plan", help="a plan saved by SparsityPlan.save (safetensors + JSON)")
    parser.add_argument(
        "--sparsity", type=float, default=None,
        help="without --plan: calibrate a quick uniform plan at this sparsity on random tokens",
    )
    parser.add_argument("--tokens", type=int, default=8, help="sample sequence length (default 8)")
    parser.add_argument("--batch", type=int, default=1, help="sample batch size (default 1)")
    parser.add_argument("--decode", action="store_true", help="also compile a one-token call (the decode shape)")
    parser.add_argument("--no-mask-prefill", action="store_true", help="backend option mask_prefill=False")
    parser.add_argument("--debug-dir", help="keep the per-graph debug files here (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)


def load_model(spec: str, tokenizer: bool = False):
    """A causal LM (eval mode, fp32) from a folder, a GGUF file, ``smollm2`` or ``random:<model_type>``;
    with ``tokenizer=True`` the pair (model, tokenizer). Bad specs exit with the reason."""
    from ..data import load_causal_lm

    try:
        model, tok = load_causal_lm(spec, tokenizer=tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"wisparse: {e}") from None
    return (model, tok) if tokenizer else model


def vocab_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if not size:
        raise SystemExit("wisparse: the model's config has no vocab_size, cannot make sample tokens")
    return int(size)


def sample_ids(model: nn.Module, batch: int, tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size(model), (batch, tokens), generator=g)


def attach_plan(model: nn.Module, args: argparse.Namespace) -> None:
    """Attach ``--plan``, or calibrate a quick plan with ``--sparsity``; neither: compile dense."""
    from .. import SparsityConfig, SparsityPlan, attach, calibrate

    if args.plan:
        attach(model, SparsityPlan.load(args.plan))
    elif args.sparsity is not None:
        batches = [sample_ids(model, 2, max(args.tokens, 16), args.seed + 1 + i) for i in range(2)]
        attach(model, calibrate(model, batches, SparsityConfig(sparsity=args.sparsity)))


@dataclass
class CompiledGraph:
    folder: Path
    report: CompileReport


def compile_into(model: nn.Module, args: argparse.Namespace, debug_dir: Path) -> list[CompiledGraph]:
    """Compile ``model`` with the wisparse backend on sample input; the graphs' debug folders."""
    options = {"debug_dir": str(debug_dir)}
    if args.no_mask_prefill:
        options["mask_prefill"] = False
    existing = {g.folder for g in read_graphs(debug_dir)} if Path(debug_dir).is_dir() else set()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="wisparse", options=options)
    ids = sample_ids(model, args.batch, args.tokens, args.seed)
    with torch.no_grad():
        compiled(ids)
        if args.decode:
            compiled(ids[:, :1])
    return [g for g in read_graphs(debug_dir) if g.folder not in existing]


def read_graphs(debug_dir: Path) -> list[CompiledGraph]:
    """The graph folders of a debug directory, in compile order."""
    graphs = []
    for folder in sorted(p for p in Path(debug_dir).iterdir() if (p / REPORT_JSON).is_file()):
        graphs.append(CompiledGraph(folder, CompileReport.from_json((folder / REPORT_JSON).read_text())))
    return graphs


WIKIPEDIA = "wikipedia"


def add_text_arguments(parser: argparse.ArgumentParser, tokens: int, length: int, part: str) -> None:
    parser.add_argument(
        "--text", default=WIKIPEDIA,
        help=f"a plain-text file, or '{WIKIPEDIA}' (default): the {part} half of the Wikipedia articles in "
        "gensim 4.4.0's test data (calibrate: first half, eval: second half)",
    )
    parser.add_argument("--tokens", type=int, default=tokens, help=f"tokens of text to use (default {tokens})")
    parser.add_argument("--length", type=int, default=length, help=f"tokens per sequence (default {length})")


def text_windows(tokenizer, args: argparse.Namespace, part: str) -> list[torch.Tensor]:
    """[1, length] id windows of ``--text``: a file, or the ``part`` ("calibration"/"evaluation") split."""
    from ..data import read_text, split_articles, token_windows, wikipedia_articles

    if args.tokens < args.length:
        raise SystemExit(f"wisparse: --tokens {args.tokens} is less than one --length {args.length} sequence")
    try:
        if args.text == WIKIPEDIA:
            calibration, evaluation = split_articles(wikipedia_articles())
            texts = calibration if part == "calibration" else evaluation
        else:
            texts = read_text(args.text)
        return token_windows(tokenizer, texts, args.length, args.tokens)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"wisparse: {e}") from None
