"""Real model, real text: SmolLM2-135M on held-out Wikipedia, dense and 50% sparse, eager and compiled."""

import math

import pytest
import torch

from wisparse_compile import SparsityConfig, attach, calibrate, detach, masked_linears
from wisparse_compile.data import load_causal_lm, split_articles, token_windows, wikipedia_articles
from wisparse_compile.eval import evaluate, overall_sparsity

#: Dense perplexity of SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized to fp32) on the first 512
#: tokens of the evaluation articles, measured on torch 2.13 CPU.
DENSE_PPL_512 = 12.4675
#: A 135M model loses a lot at 50% (DESIGN-NOTES: about +64% over 8k tokens; on this one 512-token
#: window uniform WINA measured +92%); much more means a bug.
MAX_SPARSE_RATIO = 2.5
#: Compiled vs eager-masked perplexity on one 128-token window measured 47.53 vs 44.26 (+7.4%):
#: Inductor's fp differences flip channels that sit at a threshold, and 30 masked layers compound
#: them. Not yet explained beyond that; the bound catches a wrong mask, not this drift.
COMPILED_EAGER_RTOL = 0.1


@pytest.mark.slow
def test_smollm2_dense_sparse_and_compiled_agree():
    model, tokenizer = load_causal_lm("smollm2")
    calibration_texts, evaluation_texts = split_articles(wikipedia_articles())
    calibration = token_windows(tokenizer, calibration_texts, 256, 4 * 256)
    (window,) = token_windows(tokenizer, evaluation_texts, 512, 512)

    dense = evaluate(model, [window]).perplexity
    assert dense == pytest.approx(DENSE_PPL_512, rel=2e-3)

    plan = calibrate(model, calibration, SparsityConfig(sparsity=0.5, method="wina"))
    attach(model, plan)
    try:
        mode = masked_linears()
        sparse = evaluate(model, [window], dense=model, context=lambda: mode)
        achieved = overall_sparsity(mode.sparsity(), plan.shapes)
        assert dense < sparse.perplexity < MAX_SPARSE_RATIO * dense
        assert 0.45 < achieved < 0.6  # thresholds from dense activations overshoot a little when all are masked
        assert sparse.kl_to_dense > 0 and sparse.top1_agreement > 0.5  # measured 0.58

        short = window[:, :128]
        eager = evaluate(model, [short], context=masked_linears).perplexity
        compiled = evaluate(torch.compile(model, backend="wisparse"), [short]).perplexity
        assert math.isfinite(compiled) and compiled == pytest.approx(eager, rel=COMPILED_EAGER_RTOL)
    finally:
        detach(model)
        torch._dynamo.reset()
