"""End-to-end greedy decoding tokens/s: dense ``torch.compile`` vs ``backend="wisparse"``, same mode.

    PYTHONPATH=$PWD python benchmarks/decode_bench.py                  # on a CUDA machine: ~1.1B random Llama, bf16
    PYTHONPATH=$PWD python benchmarks/decode_bench.py --smoke          # anywhere: a tiny Llama on CPU, not speed figures

The model is a random-weight Llama (hidden 2048, 16 layers, ffn 8192: about 1.1B parameters) in
bf16, large enough for decode to be memory-bound. Its thresholds come from ``wsc.calibrate``
(TEAL scores by default) on random tokens, so the achieved sparsity is real. Decoding is greedy
with a static cache: the prompt runs eagerly, each one-token step runs compiled, with
``reduce-overhead`` (CUDA graphs) for both dense and sparse. Sparsity 0 / 0.4 / 0.5 / 0.6;
sibling fusion (``fuse_siblings``) on unless ``--no-fuse``.

Writes ``benchmarks/results/decode_<gpu>.json`` (``{"device", "torch", "records"}``) and a markdown
table. ``--smoke`` (and any machine without CUDA) decodes a few tokens of a tiny model on the CPU:
the numbers prove the script works and are NOT speed figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from benchmarks.kernel_bench import SMOKE_WARNING, gpu_name

SPARSITIES = (0.0, 0.4, 0.5, 0.6)
log = logging.getLogger("decode_bench")


def llama(smoke: bool, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A random-weight Llama: ~1.1B parameters, or a tiny one for --smoke."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if smoke:
        config = LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
        )
    else:
        config = LlamaConfig(
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=32000, max_position_embeddings=1024, tie_word_embeddings=False,
        )
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


class Decoder:
    """Greedy decoding with a static cache: eager prefill, the compiled one-token step."""

    def __init__(self, model, backend: str, options: dict, prompt_len: int, new_tokens: int):
        from transformers import StaticCache

        from wisparse_compile.model_io import cache_keyword

        self.model = model
        self.step = torch.compile(model, backend=backend, options=options or None)
        self.cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens + 1)
        self.cache_keyword = cache_keyword(model)  # ``cache`` or ``past_key_values``: what its forward declares
        device = next(model.parameters()).device
        self.prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(7)).to(device)
        self.new_tokens = new_tokens

    @torch.no_grad()
    def tokens_per_s(self) -> float:
        self.cache.reset()
        length = self.prompt.shape[1]
        device = self.prompt.device
        out = self.model(input_ids=self.prompt, use_cache=True, cache_position=torch.arange(length, device=device),
                         **{self.cache_keyword: self.cache})
        token = out.logits[:, -1:].argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(self.new_tokens):
            pos = torch.tensor([length + i], device=device)
            out = self.step(input_ids=token, use_cache=True, cache_position=pos, position_ids=pos[None],
                            **{self.cache_keyword: self.cache})
            token = out.logits[:, -1:].argmax(-1).clone()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return self.new_tokens / (time.perf_counter() - t0)


def measure(decoder: Decoder, rounds: int) -> list[float]:
    decoder.tokens_per_s()  # compile + CUDA-graph recording
    return [decoder.tokens_per_s() for _ in range(rounds)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU; not speed figures")
    parser.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    parser.add_argument("--method", default="teal", choices=["teal", "wina", "wisparse"])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-fuse", action="store_true", help="leave sibling fusion off")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    import wisparse_compile as wsc
    from tqdm import tqdm

    smoke = args.smoke or not torch.cuda.is_available()
    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    new_tokens, rounds = (3, 1) if smoke else (args.new_tokens, args.rounds)
    sparsities = [0.5] if smoke else [float(s) for s in args.sparsities.split(",")]
    if smoke:
        log.warning(SMOKE_WARNING)
    # CUDA graphs for both; given as options because the wisparse backend takes mode or options.
    mode_options = {} if smoke else dict(torch._inductor.list_mode_options("reduce-overhead"))
    model = llama(smoke, dtype, device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(3)
    calib = [torch.randint(0, vocab, (1, 64 if smoke else 512), generator=g).to(device) for _ in range(2 if smoke else 8)]

    # Smoke: the dense side runs uncompiled ("eager") to keep the check fast; not a comparison.
    dense_backend = "eager" if smoke else "inductor"
    dense_tps = statistics.median(measure(Decoder(model, dense_backend, mode_options, 16, new_tokens), rounds))
    records = []
    for s in tqdm(sparsities, desc="decode bench"):
        torch._dynamo.reset()
        wsc.detach(model)
        if s > 0:
            plan = wsc.calibrate(model, calib, wsc.SparsityConfig(sparsity=s, method=args.method))
        else:
            plan = wsc.calibrate(model, calib[:1], wsc.SparsityConfig(sparsity=0.0, method="teal"))
        wsc.attach(model, plan)
        options = {**mode_options, "fuse_siblings": not args.no_fuse}
        sparse_tps = statistics.median(measure(Decoder(model, "wisparse", options, 16, new_tokens), rounds))
        records.append({
            "model": "random Llama 1.1B (h2048, 16 layers)" if not smoke else "tiny random Llama (smoke)",
            "dtype": str(dtype).removeprefix("torch."), "sparsity": s, "method": args.method,
            "fuse_siblings": not args.no_fuse, "new_tokens": new_tokens,
            "dense_tokens_per_s": dense_tps, "sparse_tokens_per_s": sparse_tps, "speedup": sparse_tps / dense_tps,
        })
    wsc.detach(model)
    result = {
        "device": torch.cuda.get_device_name() if not smoke else "cpu (smoke)", "torch": torch.__version__,
        "smoke": smoke, "mode": "reduce-overhead" if mode_options else "default", "dense_backend": dense_backend,
        "records": records,
    }
    if smoke:
        result["note"] = SMOKE_WARNING
    lines = [f"**{SMOKE_WARNING}**", ""] if smoke else []
    lines += [f"Device: {result['device']}, torch {result['torch']}, mode {result['mode']}", "",
              "| model | dtype | sparsity | dense tok/s | wisparse tok/s | speed-up |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['dtype']} | {r['sparsity']:.1f} | {r['dense_tokens_per_s']:.1f} | "
              f"{r['sparse_tokens_per_s']:.1f} | {r['speedup']:.2f}x |" for r in records]
    tag = "smoke" if smoke else gpu_name()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"decode_{tag}.json").write_text(json.dumps(result, indent=2))
    (out / f"decode_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
