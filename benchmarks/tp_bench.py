"""Tensor-parallel decode tokens/s: dense vs sparse, N ranks x T threads vs 1 process x N*T threads.

    PYTHONPATH=$PWD python benchmarks/tp_bench.py                          # CPU: random 1.1B Llama (bf16), 2 ranks x 1 thread (gloo)
    PYTHONPATH=$PWD python benchmarks/tp_bench.py --model smollm2 --nproc 3  # SmolLM2-135M (9 heads: 3 ranks)
    PYTHONPATH=$PWD python benchmarks/tp_bench.py --backend nccl --nproc 4 --model llama1b   # one GPU per rank
    PYTHONPATH=$PWD python benchmarks/tp_bench.py --dry-run              # a tiny Llama, seconds: proves the script

The driver saves the model as a Hugging Face folder and calibrates one plan on the unsharded model
(TEAL scores on random tokens, as ``cpu_bench.py``: a rough plan, the achieved sparsity is real),
then runs two configurations, each in fresh processes:

- ``single``: 1 process with N*T threads (on GPU: one device), the model loaded whole;
- ``tp``: N processes (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``, what ``torchrun``
  sets) with T threads each, the model loaded with ``from_pretrained(..., tp_plan="auto")``.

In each, a dense model (``torch.compile``, Inductor) and a sparse one (the plan attached,
``backend="wisparse"``) decode greedily from the same prefilled static cache, interleaved round by
round (``wisparse_compile.decoding``), so the dense/sparse ratio of each configuration is measured side by side;
the ratios between configurations come from the same run of this script. Each configuration also
records its greedy tokens (tensor-parallel and single must agree) and, per rank, how many planned
linears the compile report says were rewritten.

Writes ``benchmarks/results/tp/<machine>/<date>-<model>.json`` and ``.md`` (``--out-dir`` elsewhere).
``--dry-run`` runs a tiny random Llama for a few tokens: its numbers are NOT speed figures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT_LEN = 16


def _build_model(name: str, layers: int | None = None) -> torch.nn.Module:
    """The model to benchmark, unsharded: SmolLM2-135M (fp32), the random 1.1B Llama (bf16), or a tiny one."""
    from benchmarks.harness import load_smollm2, random_llama

    if name == "smollm2":
        return load_smollm2()
    if name == "llama1b":
        return random_llama("llama-1.1b", torch.bfloat16, layers=layers)
    return random_llama("tiny")


def prepare(model_name: str, folder: Path, sparsity: float, nproc: int, layers: int | None = None) -> dict:
    """Save the model as a folder and its plan (calibrated unsharded) beside it."""
    import wisparse_compile as wsc
    from benchmarks.harness import random_batches

    model = _build_model(model_name, layers)
    heads = (model.config.num_attention_heads, model.config.num_key_value_heads)
    if any(h % nproc for h in heads):
        raise SystemExit(f"{model_name} has {heads[0]} attention and {heads[1]} kv heads: transformers' tensor "
                         f"parallelism needs both to divide by the rank count, and {nproc} does not")
    model.save_pretrained(folder / "model")
    batches = random_batches(model.config.vocab_size, 2, 64)
    plan = wsc.calibrate(model, batches, wsc.SparsityConfig(sparsity=sparsity, method="teal", allocation=wsc.Uniform()))
    plan.save(folder / "plan.wsp")
    return {"parameters": sum(p.numel() for p in model.parameters()), "dtype": str(model.dtype).removeprefix("torch."),
            "planned_linears": len(plan.names)}


# ---- one process of a configuration -------------------------------------------------------------

def run_process(args: argparse.Namespace) -> None:
    """Decode dense and sparse in this process (one rank of ``tp``, or ``single``); rank 0 writes JSON."""
    import transformers

    import wisparse_compile as wsc
    from wisparse_compile.backend import COMPILED_REPORTS
    from wisparse_compile.decoding import GreedyDecoder, interleaved_tokens_per_s, median

    torch.set_num_threads(args.threads)
    tp = args.role == "tp"
    rank = int(os.environ.get("RANK", 0))
    device = "cpu"
    if args.backend == "nccl":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if tp:
        torch.distributed.init_process_group(args.backend)  # transformers uses the group that exists
    folder = Path(args.folder)

    def load() -> torch.nn.Module:
        if tp:
            return transformers.AutoModelForCausalLM.from_pretrained(folder / "model", dtype="auto", tp_plan="auto").eval()
        # not device_map: its dispatch hooks would slow the single process down
        return transformers.AutoModelForCausalLM.from_pretrained(folder / "model", dtype="auto").to(device).eval()

    dense_model, sparse_model = load(), load()
    prompt = torch.randint(0, dense_model.config.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(7))
    tokens = max(args.new_tokens, args.warmup_tokens)
    decoders = {"dense": GreedyDecoder(dense_model, args.dense_backend, PROMPT_LEN, tokens, prompt=prompt)}
    decoders["sparse"] = GreedyDecoder(sparse_model, "wisparse", PROMPT_LEN, tokens, prompt=prompt)  # prefill before attach
    plan = wsc.SparsityPlan.load(folder / "plan.wsp")
    wsc.attach(sparse_model, plan)
    t0 = time.perf_counter()
    warmup = {name: d.tokens_per_s(args.warmup_tokens) for name, d in decoders.items()}  # compiles
    compile_s = time.perf_counter() - t0
    samples = interleaved_tokens_per_s(decoders, args.rounds, args.new_tokens, desc=f"{args.role} rank {rank}")
    reports = [{"rank": r.rank, "rewritten": r.rewritten, "summary": r.summary()} for r in COMPILED_REPORTS]
    result = {
        "role": args.role, "world_size": int(os.environ.get("WORLD_SIZE", 1)), "threads": args.threads,
        "backend": args.backend if tp else None, "device": device,
        "tokens_per_s": {name: median(s) for name, s in samples.items()}, "samples": samples,
        "speedup": median(samples["sparse"]) / median(samples["dense"]),
        "tokens": {name: d.last_tokens for name, d in decoders.items()},
        "warmup_tokens_per_s": warmup, "compile_s": round(compile_s, 1),
        "planned_linears": len(plan.names), "reports": reports,
    }
    all_results = [None] * result["world_size"]
    if tp:
        torch.distributed.all_gather_object(all_results, {"rank": rank, "reports": reports})
        result["reports_per_rank"] = all_results
        torch.distributed.destroy_process_group()
    if rank == 0:
        Path(args.result).write_text(json.dumps(result, indent=1))


# ---- the driver ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(role: str, nproc: int, threads: int, args: argparse.Namespace, folder: Path) -> dict:
    """Run one configuration in ``nproc`` fresh processes (as torchrun would); rank 0's result."""
    result = folder / f"{role}.json"
    port = _free_port()
    command = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--folder", str(folder),
               "--result", str(result), "--threads", str(threads), "--backend", args.backend,
               "--new-tokens", str(args.new_tokens), "--warmup-tokens", str(args.warmup_tokens),
               "--rounds", str(args.rounds), "--dense-backend", args.dense_backend]
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        if role == "tp":
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(command, env=env, cwd=ROOT))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{role}: a process failed (exit codes {codes})")
    return json.loads(result.read_text())


def markdown(setup: dict, record: dict) -> str:
    single, tp = record["single"], record["tp"]
    n, t = setup["nproc"], setup["threads_per_rank"]
    rows = [
        ("1 process", f"{n * t} threads", single),
        (f"{n} ranks (tensor parallel, {setup['backend']})", f"{t} thread{'s' if t > 1 else ''} each", tp),
    ]
    lines = [
        f"{setup['model']} ({setup['parameters'] / 1e6:,.1f}M parameters, {setup['dtype']}), sparsity "
        f"{setup['sparsity']}, {setup['new_tokens']} greedy tokens x {setup['rounds']} rounds.",
        "",
        f"| setup | threads | dense ({setup['dense_backend']}) tok/s | sparse (wisparse) tok/s | sparse / dense |",
        "|---|---|---|---|---|",
    ]
    for label, threads, r in rows:
        d, s = r["tokens_per_s"]["dense"], r["tokens_per_s"]["sparse"]
        lines.append(f"| {label} | {threads} | {d:.1f} | {s:.1f} | {s / d:.2f}x |")
    ratio = record["tp_vs_single"]
    lines += ["", f"Tensor parallel vs 1 process: dense {ratio['dense']:.2f}x, sparse {ratio['sparse']:.2f}x. "
              f"Greedy tokens of the two setups equal: dense {record['tokens_equal']['dense']}, sparse "
              f"{record['tokens_equal']['sparse']}. Planned linears rewritten per rank: {record['rewritten_per_rank']} "
              f"of {setup['planned_linears']}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("llama1b", "smollm2", "tiny"), default="llama1b",
                        help="smollm2 has 9 attention / 3 kv heads: tensor parallel over 3 ranks, not 2")
    parser.add_argument("--nproc", type=int, default=2, help="tensor-parallel ranks")
    parser.add_argument("--layers", type=int, default=None, help="llama1b: fewer decoder layers (a quick check of the bf16 path)")
    parser.add_argument("--threads-per-rank", type=int, default=1, help="the single process gets nproc x this")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo", help="nccl: one CUDA device per rank")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--warmup-tokens", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dense-backend", choices=("inductor", "eager"), default="inductor",
                        help="how the dense model's decode step runs (--dry-run: eager, to compile half as much)")
    parser.add_argument("--machine", default=None, help="results folder name (default: harness.machine_id())")
    parser.add_argument("--out-dir", "--out", dest="out_dir", default=None,
                        help="default benchmarks/results (--dry-run: a temporary folder)")
    parser.add_argument("--dry-run", action="store_true", help="tiny random Llama, 4 tokens, 1 round: not speed figures")
    parser.add_argument("--role", choices=("single", "tp"), help=argparse.SUPPRESS)  # a worker process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        run_process(args)
        return None
    if args.dry_run:
        args.model, args.new_tokens, args.warmup_tokens, args.rounds, args.dense_backend = "tiny", 4, 2, 1, "eager"
    if args.backend == "nccl" and torch.cuda.device_count() < args.nproc:
        raise SystemExit(f"--backend nccl needs a CUDA device per rank: {args.nproc} ranks, "
                         f"{torch.cuda.device_count()} devices")
    with tempfile.TemporaryDirectory(prefix="tp_bench_") as tmp:
        folder = Path(tmp)
        info = prepare(args.model, folder, args.sparsity, args.nproc, args.layers)
        single = launch("single", 1, args.nproc * args.threads_per_rank, args, folder)
        tp = launch("tp", args.nproc, args.threads_per_rank, args, folder)
    setup = {
        "model": args.model, **info, "sparsity": args.sparsity, "nproc": args.nproc,
        "threads_per_rank": args.threads_per_rank, "backend": args.backend, "new_tokens": args.new_tokens,
        "rounds": args.rounds, "layers": args.layers, "dense_backend": args.dense_backend,
    }
    record = {
        "tp_vs_single": {k: tp["tokens_per_s"][k] / single["tokens_per_s"][k] for k in ("dense", "sparse")},
        "tokens_equal": {k: tp["tokens"][k] == single["tokens"][k] for k in ("dense", "sparse")},
        "rewritten_per_rank": [max((r["rewritten"] for r in rank["reports"]), default=0) for rank in tp["reports_per_rank"]],
        "single": single, "tp": tp,
    }
    from benchmarks.harness import out_dir_for, write_result

    table = markdown(setup, record)
    variant = args.model + (f"-{args.layers}layers" if args.layers else "")
    result = write_result("tp", setup, [record], table, out_dir=out_dir_for(args.out_dir, args.dry_run, "tp"),
                          machine=args.machine, variant=variant, device="cuda" if args.backend == "nccl" else "cpu",
                          dry_run=args.dry_run)
    print(table)
    return result

if __name__ == "__main__":
    main()
