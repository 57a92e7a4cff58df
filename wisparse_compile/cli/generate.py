"""``wisparse generate MODEL --plan PLAN --prompt TEXT``: chat answers, dense and sparse, with tokens/s.

Both run Hugging Face ``generate`` with a static KV cache; by default the decode step is compiled
with ``CompileConfig(backend="wisparse")`` (dense: no plan attached; sparse: the plan attached),
after a short warm-up so tokens/s excludes compilation. ``--eager`` masks eagerly instead.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping

from .session import load_model

NAME = "generate"
HELP = "answer a chat prompt densely and sparsely, side by side, with tokens/s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a Hugging Face model folder, a .gguf file, smollm2, or random:<model_type>")
    parser.add_argument("--plan", required=True, help="a plan saved by `wisparse calibrate`")
    parser.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--eager", action="store_true", help="no torch.compile: mask eagerly with masked_linears")


def chat_ids(tokenizer, prompt: str):
    """[1, n] input ids of a one-turn chat ending in the assistant's turn."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt")
    return ids["input_ids"] if isinstance(ids, Mapping) else ids


def generation_kwargs(tokenizer, max_new_tokens: int, compile: bool) -> dict:
    """Greedy decoding with a static cache; with ``compile``, the wisparse backend on every device."""
    from transformers import CompileConfig

    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "cache_implementation": "static",
              "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}
    if compile:
        config = CompileConfig(backend="wisparse", fullgraph=False)
        config._compile_all_devices = True  # transformers compiles on CPU only when asked
        kwargs["compile_config"] = config
    else:
        kwargs["disable_compile"] = True
    return kwargs


def timed_generate(model, tokenizer, ids, args: argparse.Namespace, context) -> tuple[str, float]:
    """(answer, new tokens per second), after an identical warm-up call that compiles (the static
    cache's length is part of the compiled shapes, so a shorter warm-up would not do)."""
    import torch

    kwargs = generation_kwargs(tokenizer, args.max_new_tokens, compile=not args.eager)
    with torch.no_grad(), context():
        model.generate(ids, **kwargs)
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), new.numel() / seconds


def _recompile(model) -> None:
    """Forget compiled code so the next generate compiles against the current plan."""
    import torch

    torch._dynamo.reset()
    if hasattr(model, "_compiled_call"):
        del model._compiled_call


def run(args: argparse.Namespace) -> int:
    import contextlib

    from .. import SparsityPlan, attach, masked_linears
    from ..backend import COMPILED_REPORTS

    plan = SparsityPlan.load(args.plan)
    model, tokenizer = load_model(args.model, tokenizer=True)
    ids = chat_ids(tokenizer, args.prompt)
    _recompile(model)
    dense_text, dense_tps = timed_generate(model, tokenizer, ids, args, contextlib.nullcontext)
    attach(model, plan)
    _recompile(model)
    first = len(COMPILED_REPORTS)
    sparse_text, sparse_tps = timed_generate(model, tokenizer, ids, args,
                                             masked_linears if args.eager else contextlib.nullcontext)
    how = "eager" if args.eager else "compiled, backend=wisparse"
    print(f"prompt: {args.prompt}\n")
    print(f"dense ({dense_tps:.1f} tok/s, {how}):\n{dense_text}\n")
    print(f"sparse {plan.method} ({sparse_tps:.1f} tok/s, {how}):\n{sparse_text}")
    if not args.eager:
        reports = COMPILED_REPORTS[first:]
        print(f"\n{len(reports)} graph(s) compiled for sparse decoding: "
              + "; ".join(r.summary() for r in reports))
    return 0
