"""Tensor-parallel sparse decoding: one plan file, the model sharded by transformers over N processes.

    wisparse calibrate smollm2 -o plan.wsp --sparsity 0.5          # once, on the unsharded model
    PYTHONPATH=$PWD torchrun --nproc-per-node 2 examples/tp_generate.py smollm2 plan.wsp --prompt "The capital of France"

MODEL is what the ``wisparse`` CLI takes (a Hugging Face folder, a ``.gguf`` file, ``smollm2``).
Each rank loads it with ``from_pretrained(..., tp_plan="auto")`` (DTensor weights: column-parallel
layers split their output dim, row-parallel ones their input dim), ``wsc.attach`` gives each
rank's shards the slice of the plan's thresholds they need, and ``generate`` runs its decode step
compiled by ``backend="wisparse"``: the sparse op runs on each rank's local shard, the engine's
all-reduces stay where they were. torchrun picks gloo on CPU, NCCL with one GPU per rank
(``--device cuda``). Rank 0 prints the text and tokens/s; every rank prints its compile report.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CompileConfig

import wisparse_compile as wsc
from wisparse_compile.backend import COMPILED_REPORTS
from wisparse_compile.data import smollm2_gguf


def load(spec: str, device: str):
    """(model, tokenizer), the model sharded over the torchrun processes."""
    path = smollm2_gguf() if spec == "smollm2" else Path(spec)
    kwargs, folder = ({"gguf_file": path.name}, str(path.parent)) if path.suffix == ".gguf" else ({}, str(path))
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto", dtype="auto", **kwargs)
    return model.eval(), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("plan")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", 0))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))

    model, tokenizer = load(args.model, args.device)
    wsc.attach(model, wsc.SparsityPlan.load(args.plan))
    config = CompileConfig(backend="wisparse", fullgraph=False)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    ids = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    kwargs = dict(max_new_tokens=args.new_tokens, do_sample=False, cache_implementation="static", compile_config=config)
    with torch.no_grad():
        model.generate(**ids, **kwargs)  # warm-up: compiles the decode step
        start = time.perf_counter()
        out = model.generate(**ids, **kwargs)
        seconds = time.perf_counter() - start
    new = out[0, ids["input_ids"].shape[1]:]
    for report in COMPILED_REPORTS:
        print(report.summary(), flush=True)  # "rank r: N linears: N-1 sparse, 1 dense (1 no plan entry)"
    if rank == 0:
        print(f"{tokenizer.decode(new, skip_special_tokens=True)!r} ({new.numel() / seconds:.1f} tok/s)")


if __name__ == "__main__":
    main()
