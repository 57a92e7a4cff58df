"""What the debugging subcommands share: load a model, attach a plan, compile it into a debug dir."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..debug.dump import REPORT_JSON
from ..debug.report import GraphReport

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"
#: Sizes of a ``random:<model_type>`` model (only the config attributes the model type has are set).
TINY_SIZES = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256, "max_position_embeddings": 128,
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help="a Hugging Face model folder, a .gguf file, or random:<model_type> (e.g. random:llama) "
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


def load_model(spec: str) -> nn.Module:
    """A causal LM from a folder, a GGUF file, or ``random:<model_type>``; eval mode, fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.startswith(RANDOM_PREFIX):
        model_type = spec[len(RANDOM_PREFIX):]
        try:
            config = AutoConfig.for_model(model_type)
        except ValueError as e:
            raise SystemExit(f"wisparse: unknown transformers model type {model_type!r} in {spec!r}: {e}") from None
        for key, value in TINY_SIZES.items():
            if hasattr(config, key):
                setattr(config, key, value)
        return AutoModelForCausalLM.from_config(config).eval()
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    if path.is_dir():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    raise SystemExit(
        f"wisparse: {spec!r} is neither a model folder, a .gguf file nor random:<model_type>; "
        "give a path that exists or e.g. random:llama"
    )


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
    report: GraphReport


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
        graphs.append(CompiledGraph(folder, GraphReport.from_json((folder / REPORT_JSON).read_text())))
    return graphs
