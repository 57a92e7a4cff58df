"""End-to-end greedy decoding tokens/s: dense ``torch.compile`` vs ``backend="wisparse"``, same mode.

    PYTHONPATH=$PWD python benchmarks/decode_bench.py                  # on a CUDA machine: ~1.1B random Llama, bf16
    PYTHONPATH=$PWD python benchmarks/decode_bench.py --dry-run        # anywhere: a tiny Llama on CPU, not speed figures

The model is a random-weight Llama (``harness.LLAMA_SHAPES["llama-1.1b"]``: hidden 2048, 16 layers,
ffn 8192, about 1.1B parameters) in bf16, large enough for decode to be memory-bound. Its plans
come from ``wsc.calibrate`` (TEAL scores by default) on random tokens, one per sparsity, so the
achieved sparsity is real. Decoding is ``harness.decode_comparison``: greedy with a static cache,
the prompt prefilled eagerly once, each one-token step compiled with ``reduce-overhead`` (CUDA
graphs) for dense and sparse alike; one compiled sparse model serves every plan (swapped by
``attach``), and dense and every sparsity run interleaved round by round. Sparsity 0 / 0.4 / 0.5 /
0.6; sibling fusion (``fuse_siblings``) on unless ``--no-fuse``.

Writes ``benchmarks/results/decode/<gpu>/<date>.json`` and the markdown table beside it.
``--dry-run`` (and any machine without CUDA) decodes a few tokens of a tiny model on
the CPU, the dense side uncompiled: the numbers prove the script works and are NOT speed figures.
"""

from __future__ import annotations

import argparse
import copy
import logging

import torch

from benchmarks.harness import DRY_RUN_NOTE, decode_comparison, out_dir_for, random_batches, random_llama, write_result

SPARSITIES = (0.0, 0.4, 0.5, 0.6)
log = logging.getLogger("decode_bench")


def markdown(records: list[dict], mode: str) -> str:
    lines = [f"Mode {mode}", "", "| model | dtype | sparsity | dense tok/s | wisparse tok/s | speed-up |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['dtype']} | {r['sparsity']:.1f} | {r['dense_tokens_per_s']:.1f} | "
              f"{r['sparse_tokens_per_s']:.1f} | {r['speedup']:.2f}x |" for r in records]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU; not speed figures")
    parser.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    parser.add_argument("--method", default="teal", choices=["teal", "wina", "wisparse"])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-fuse", action="store_true", help="leave sibling fusion off")
    parser.add_argument("--out-dir", default=None, help="default benchmarks/results (--dry-run: a temporary folder)")
    args = parser.parse_args(argv)
    import wisparse_compile as wsc

    dry = args.dry_run or not torch.cuda.is_available()
    device, dtype = ("cpu", torch.float32) if dry else ("cuda", torch.bfloat16)
    new_tokens, rounds = (3, 1) if dry else (args.new_tokens, args.rounds)
    sparsities = [0.5] if dry else [float(s) for s in args.sparsities.split(",")]
    if dry:
        log.warning(DRY_RUN_NOTE)
    # CUDA graphs for both; given as options because the wisparse backend takes mode or options.
    mode_options = {} if dry else dict(torch._inductor.list_mode_options("reduce-overhead"))
    dense_model = (random_llama("tiny", layers=1) if dry else random_llama("llama-1.1b", dtype)).to(device)
    sparse_model = copy.deepcopy(dense_model)
    calib = [b.to(device) for b in random_batches(dense_model.config.vocab_size, 2 if dry else 8, 64 if dry else 512)]
    plans = {}
    for s in sparsities:
        config = wsc.SparsityConfig(sparsity=s, method=args.method) if s > 0 else wsc.SparsityConfig(sparsity=0.0, method="teal")
        plans[s] = wsc.calibrate(sparse_model, calib if s > 0 else calib[:1], config)
    # dry run: the dense side runs uncompiled ("eager") to keep the check fast; not a comparison
    dense_backend = "eager" if dry else "inductor"
    name = "tiny random Llama (dry run)" if dry else "random Llama 1.1B (h2048, 16 layers)"
    records = decode_comparison(
        name, dense_model, sparse_model, plans, dtype=str(dtype).removeprefix("torch."), new_tokens=new_tokens,
        rounds=rounds, dense_backend=dense_backend, options=mode_options, sparse_options={"fuse_siblings": not args.no_fuse},
    )
    mode = "reduce-overhead" if mode_options else "default"
    setup = {"model": name, "method": args.method, "fuse_siblings": not args.no_fuse, "mode": mode,
             "dense_backend": dense_backend, "sparsities": sparsities, "new_tokens": new_tokens, "rounds": rounds}
    table = markdown(records, mode)
    result = write_result("decode", setup, records, table, out_dir=out_dir_for(args.out_dir, dry, "decode"),
                          device=device, dry_run=dry)
    print(table)
    return {**result, "smoke": dry}  # ``smoke``: what benchmarks/gpu_check.py reads


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
