"""What a tensor subclass for planned float weights would cost, next to the strided view attach uses.

    PYTHONPATH=$PWD python benchmarks/weight_subclass_cost.py
    PYTHONPATH=$PWD python benchmarks/weight_subclass_cost.py --dry-run    # seconds, NOT figures

``attach`` re-lays a planned float weight input-major as a plain strided view (``[out, in]`` with
strides ``(1, out)``) and hangs its plan slot on it (``planned.py``). The alternative, a wrapper
subclass per planned weight as the int8/int4 weights are (``quant/tensors.py``), is measured here with
the thinnest such subclass (``InputMajorWeight``: same storage, ``__torch_dispatch__`` unwraps to the
view, ``__tensor_flatten__`` for torch.compile), side by side with the plain view, interleaved round
by round:

- ``eager``: ``F.linear`` per call at batch 1 on SmolLM2's shapes (what calibration, the eager
  reference and an uncompiled prefill pay);
- ``compiled``: one step of a chain of 210 linears (SmolLM2's count: 30 layers x 7) compiled by
  Inductor, weights plain vs subclass parameters: a subclass graph input is unwrapped in Python
  by AOT autograd's runtime wrapper on every call, outside any CUDA graph.

Writes ``results/weight_subclass_cost/<machine>/<date>.json`` and the table beside it.
"""

from __future__ import annotations

import argparse
import logging

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map_only

from benchmarks.harness import interleaved, out_dir_for, summary, time_ms, write_result

log = logging.getLogger(__name__)
SHAPES = [(1536, 576), (576, 1536), (576, 576)]  # [out, in]: SmolLM2-135M's MLP and attention


class InputMajorWeight(torch.Tensor):
    """An ``[out, in]`` float weight over an input-major storage ``data_t [in, out]``: the hypothetical
    planned-float-weight subclass, as thin as one can be (every op runs on the plain view)."""

    @staticmethod
    def __new__(cls, data_t: torch.Tensor):
        k, n = data_t.shape
        return torch.Tensor._make_wrapper_subclass(cls, (n, k), strides=(1, n), dtype=data_t.dtype,
                                                   device=data_t.device, requires_grad=False)

    def __init__(self, data_t: torch.Tensor) -> None:
        self.data_t = data_t

    def __tensor_flatten__(self):
        return ["data_t"], None

    @classmethod
    def __tensor_unflatten__(cls, inner, meta, outer_size, outer_stride):
        return cls(inner["data_t"])

    def _stable_hash_for_caching(self) -> str:
        return f"InputMajorWeight/{self.dtype}/{tuple(self.shape)}"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return cls(func(args[0].data_t))
        plain = tree_map_only(InputMajorWeight, lambda w: w.data_t.t(), (args, kwargs))
        return func(*plain[0], **plain[1])


class LinearChain(torch.nn.Module):
    """``count`` bias-free linears in a row (tanh between), a stand-in for a decode step's linears."""

    def __init__(self, count: int, dim: int) -> None:
        super().__init__()
        self.linears = torch.nn.ModuleList(torch.nn.Linear(dim, dim, bias=False) for _ in range(count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for linear in self.linears:
            x = linear(x).tanh()
        return x


def eager_records(rounds: int, calls: int) -> list[dict]:
    records = []
    g = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        weight = torch.randn(n, k, generator=g) / k**0.5
        plain, wrapped = weight.t().contiguous().t(), InputMajorWeight(weight.t().contiguous())
        x = torch.randn(1, k, generator=g)
        torch.testing.assert_close(F.linear(x, wrapped), F.linear(x, plain))
        samples = interleaved({"plain": lambda: 1e3 * time_ms(lambda: F.linear(x, plain), calls),
                               "subclass": lambda: 1e3 * time_ms(lambda: F.linear(x, wrapped), calls)}, rounds)
        records.append(_record("eager F.linear, batch 1", f"{n}x{k}", samples))
    return records


def compiled_record(rounds: int, calls: int, count: int, dim: int = 64) -> dict:
    torch.manual_seed(0)
    plain, wrapped = LinearChain(count, dim), LinearChain(count, dim)
    wrapped.load_state_dict(plain.state_dict())
    for p, w in zip(plain.linears, wrapped.linears):
        p.weight = torch.nn.Parameter(p.weight.detach().t().contiguous().t(), requires_grad=False)
        w.weight = torch.nn.Parameter(InputMajorWeight(w.weight.detach().t().contiguous()), requires_grad=False)
    x = torch.randn(1, dim)
    with torch.no_grad():
        steps = {"plain": torch.compile(plain), "subclass": torch.compile(wrapped)}
        torch.testing.assert_close(steps["subclass"](x), steps["plain"](x))
        samples = interleaved({name: (lambda step=step: 1e3 * time_ms(lambda: step(x), calls)) for name, step in steps.items()},
                              rounds)
    return _record(f"compiled step of {count} linears", f"{dim}x{dim}", samples)


def _record(case: str, shape: str, samples: dict[str, list[float]]) -> dict:
    plain, wrapped = summary(samples["plain"]), summary(samples["subclass"])
    return {"case": case, "shape": shape, "plain_us": plain["median"], "plain_range_us": [plain["min"], plain["max"]],
            "subclass_us": wrapped["median"], "subclass_range_us": [wrapped["min"], wrapped["max"]],
            "added_us": wrapped["median"] - plain["median"], "ratio": wrapped["median"] / plain["median"]}


def table(records: list[dict]) -> str:
    lines = ["| case | shape | plain strided view, us: median (min) | subclass, us: median (min) | added: median (min) | "
             "ratio of medians |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['shape']} | {r['plain_us']:.1f} ({r['plain_range_us'][0]:.1f}) | {r['subclass_us']:.1f} "
              f"({r['subclass_range_us'][0]:.1f}) | {r['added_us']:+.1f} ({r['subclass_range_us'][0] - r['plain_range_us'][0]:+.1f}) | "
              f"{r['ratio']:.2f}x |" for r in records]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--dry-run", action="store_true", help="few calls, 8 linears: checks the script, NOT figures")
    parser.add_argument("--out-dir", default=None, help="default benchmarks/results (--dry-run: a temporary folder)")
    args = parser.parse_args(argv)
    rounds, calls, count = (2, 20, 8) if args.dry_run else (args.rounds, 2000, 210)
    records = eager_records(rounds, calls) + [compiled_record(rounds, max(1, calls // 10), count)]
    text = table(records)
    print(text)
    setup = {"rounds": rounds, "calls_per_sample": calls, "compiled_linears": count, "threads": torch.get_num_threads()}
    return write_result("weight_subclass_cost", setup, records, text,
                        out_dir=out_dir_for(args.out_dir, args.dry_run, "weight_subclass_cost"), dry_run=args.dry_run)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
