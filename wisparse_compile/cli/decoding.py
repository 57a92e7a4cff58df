"""Timed greedy decoding with a static cache: how the demo, the CLI and the benchmarks measure tokens/s.

``GreedyDecoder`` prefills a prompt once (eagerly) and compiles the one-token decode step; each
timed run restores the cache to its post-prefill state, so runs of several models (dense vs sparse)
decode from the same state and can be interleaved round by round (``interleaved_tokens_per_s``):
load from other processes then hits every model alike, and ratios measured side by side hold.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..backend import decode_compile_options
from ..model_io import cache_keyword


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
                 prompt: torch.Tensor | None = None):
        from transformers import StaticCache

        self.model = model
        # a decode loop changes no module attribute: skip Dynamo's module guards (dense and sparse alike),
        # on a backend object of this decoder's own (own_backend)
        self.step = torch.compile(model, backend=own_backend(backend), options=decode_compile_options())
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
            tokens.append(int(token))
        elapsed = time.perf_counter() - t0
        self.last_tokens = tokens
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
