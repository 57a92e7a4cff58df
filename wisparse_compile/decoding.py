"""Compiling and timing a decode step: the guard filter, the backend object it needs, and a greedy decoder.

Two helpers go together: ``decode_compile_options`` drops Dynamo's module guards (most of a small
model's per-step overhead), and ``own_backend`` gives each compiled model a backend object of its
own, which is what keeps two models of one class apart once those guards are gone. Use both or
neither.

``GreedyDecoder`` prefills a prompt once (eagerly) and compiles the one-token decode step with
them; each timed run restores the cache to its post-prefill state, so runs of several models
(dense vs sparse) decode from the same state and can be interleaved round by round
(``interleaved_tokens_per_s``): load from other processes then hits every model alike, and ratios
measured side by side hold. The demo, the examples and the benchmarks measure tokens/s with it.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .model_io import cache_keyword


def decode_compile_options() -> dict[str, Any]:
    """``torch.compile`` options for a decode step whose module attributes stay as compiled.

    Dynamo checks guards on every module attribute and parameter before each call: ~10,000 guards
    on SmolLM2-135M, 2.3-2.5 ms of a 13-16 ms int8 decode step on a 2-core EPYC (1.4 ms dense), more
    than its attention. torch's ``skip_guard_on_all_nn_modules_unsafe`` filter drops the module
    guards (inputs such as the cache stay guarded); measured 0.4 ms. Safe for wisparse's own
    changes: a plan swap (``attach`` again) keeps the weights, and a weight replaced under the
    compiled graph (``detach``, another ``weights=`` mode) raises ``WeightLayoutChanged`` for the
    planned weights. Not for models whose attributes change after compiling (``train()``/``eval()``,
    config flags): Dynamo would not notice. Nor does it tell two models of one class apart: compile
    each with a backend object of its own (``wsc.WisparseBackend()`` makes a new one;
    ``own_backend`` below wraps any), or the second runs the first one's graph.

    The same holds for Inductor's per-call size/stride and alignment asserts, which these options
    turn off too (Inductor config keys, passed on by the ``wisparse`` and ``inductor`` backends):
    one assert per graph input, ~940 on SmolLM2 (its parameters, thresholds and cache), 0.5 ms of
    a 9 ms int8 step. What they would catch is a parameter re-laid after compiling, which the
    skipped guards already leave to the caller; the planned weights keep the ``WeightLayoutChanged``
    check. On a torch without the filter the dict is empty: the asserts stay, as the guards do.
    """
    filter_fn = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
    if filter_fn is None:
        return {}
    return {"guard_filter_fn": filter_fn, "size_asserts": False, "alignment_asserts": False}


def own_backend(backend: str | Callable[..., Any]) -> Callable[..., Any]:
    """``backend`` as a new callable object: one compiled model per object.

    Dynamo keeps compiled code per code object (a model class's ``forward``), told apart by guards
    and by the backend. With the module guards skipped (``decode_compile_options``), two models of
    one class compiled with the same backend would share the first one's graph (another model's
    weight layout, config constants baked in); a backend of their own keeps them apart.
    """
    if backend == "inductor":  # called by name, torch.compile hands Inductor its options as config patches
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        def compile_step(gm: torch.fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Callable[..., Any]:
            mode, options = kwargs.pop("mode", None), kwargs.pop("options", None)
            patches = {**(list_mode_options(mode) if mode else {}), **(options or {})}
            return compile_fx(gm, example_inputs, config_patches=patches, **kwargs)

        return compile_step
    compile_fn = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend

    def compile_step(gm: torch.fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Callable[..., Any]:
        return compile_fn(gm, example_inputs, **kwargs)

    return compile_step


class GreedyDecoder:
    """Greedy decoding with a static cache: the prompt prefilled once (eager), the one-token step compiled.

    The prefill runs once, here, and the cache's tensors (keys, values, the static layers' write
    counter) are snapshotted; every run restores them in place, so each one decodes from the same
    state. Build the sparse model's decoder *before* ``wsc.attach``: attach re-lays planned weights
    input-major, and PyTorch's eager bf16 CPU GEMM is 20-40x slower on that layout on CPUs without
    native bf16 (no compiled graph routes the eager prefill). The cache goes in under the keyword
    the model's forward declares (``model_io.cache_keyword``: ``cache`` from transformers' rename
    on, ``past_key_values`` before it), so no deprecation warning comes with each step.
    """

    def __init__(self, model: torch.nn.Module, backend: str, prompt_len: int, new_tokens: int,
                 prompt: torch.Tensor | None = None, options: dict[str, Any] | None = None):
        from transformers import StaticCache

        self.model = model
        # a decode loop changes no module attribute: skip Dynamo's module guards (dense and sparse alike),
        # on a backend object of this decoder's own (own_backend); ``options`` add to them (an Inductor
        # mode's options, the wisparse backend's)
        options = {**decode_compile_options(), **(options or {})}
        self.step = torch.compile(model, backend=own_backend(backend), options=options or None)
        if prompt is None:  # random tokens: the speed of a decode step does not depend on them
            prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(7))
        if tuple(prompt.shape) != (1, prompt_len):
            raise ValueError(f"prompt must be [1, prompt_len={prompt_len}] token ids, got {tuple(prompt.shape)}")
        self.prompt_len = prompt_len
        self.device = next(model.parameters()).device  # a tensor-parallel (DTensor) weight: its local device
        prompt = prompt.to(self.device)
        self.cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens + 1)
        self.new_tokens = new_tokens
        self.cache_keyword = cache_keyword(model)
        with torch.no_grad():
            out = model(input_ids=prompt, use_cache=True, cache_position=torch.arange(prompt_len, device=self.device),
                        **{self.cache_keyword: self.cache})
        self.first_token = out.logits[:, -1:].argmax(-1)
        self.last_tokens: list[int] = []
        self.snapshot = [  # (layer, attribute, value): tensors cloned, plain counters (sliding layers) as is
            (layer, name, value.clone() if isinstance(value, torch.Tensor) else value)
            for layer in self.cache.layers for name, value in vars(layer).items()
            if isinstance(value, (torch.Tensor, int)) and not isinstance(value, bool)
        ]

    def restore(self) -> None:
        """Put the cache back as the prefill left it (tensors in place: compiled graphs keep their addresses)."""
        for layer, name, saved in self.snapshot:
            if isinstance(saved, torch.Tensor):
                getattr(layer, name).copy_(saved)
            else:
                setattr(layer, name, saved)

    @torch.no_grad()
    def tokens_per_s(self, new_tokens: int | None = None) -> float:
        """Decode ``new_tokens`` greedily from the prefilled state; the tokens land in ``last_tokens``."""
        new_tokens = new_tokens or self.new_tokens
        if new_tokens > self.new_tokens:
            raise ValueError(f"the cache holds {self.new_tokens} new tokens; asked for {new_tokens}")
        self.restore()
        token, tokens = self.first_token, []
        t0 = time.perf_counter()
        for i in range(new_tokens):
            pos = self.prompt_len + i
            out = self.step(
                input_ids=token, use_cache=True,
                cache_position=torch.tensor([pos], device=self.device),
                position_ids=torch.tensor([[pos]], device=self.device),
                **{self.cache_keyword: self.cache},
            )
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)  # no host sync per step: a GPU keeps queueing steps
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - t0
        self.last_tokens = torch.cat(tokens, dim=1).flatten().tolist()
        return new_tokens / elapsed


def interleaved_tokens_per_s(
    decoders: dict[str, GreedyDecoder], rounds: int, new_tokens: int | None = None, desc: str = "decoding"
) -> dict[str, list[float]]:
    """Tokens/s of each decoder over ``rounds`` rounds, one run of each per round (side by side)."""
    samples: dict[str, list[float]] = {name: [] for name in decoders}
    for _ in tqdm(range(rounds), desc=desc, unit="round", leave=False):
        for name, decoder in decoders.items():
            samples[name].append(decoder.tokens_per_s(new_tokens))
    return samples


def median(samples: list[float]) -> float:
    return statistics.median(samples)
