"""``GreedyDecoder`` (wisparse_compile/decoding.py) with the installed transformers: the cache goes in
under the keyword the model's forward declares, so the decode raises no deprecation warning, and
its tokens are the cache-free greedy tokens (a cache passed under a name the forward ignored would
leave every step without the prompt)."""

import warnings

import torch

from tests.conftest import tiny_llama
from wisparse_compile.decoding import GreedyDecoder
from wisparse_compile.model_io import cache_keyword


@torch.no_grad()
def _greedy_without_cache(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy tokens from re-running the whole sequence each step (no KV cache at all)."""
    ids, tokens = prompt, []
    for _ in range(new_tokens + 1):
        token = model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)
        ids = torch.cat([ids, token], 1)
        tokens.append(int(token))
    return tokens


def test_greedy_decoder_passes_the_cache_under_the_forwards_keyword_without_a_deprecation_warning():
    model = tiny_llama(layers=1)
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decoder = GreedyDecoder(model, "eager", prompt_len=8, new_tokens=5, prompt=prompt)  # the eager prefill
        decoder.tokens_per_s()  # the compiled steps
    cache_warnings = [str(w.message) for w in caught if "past_key_values" in str(w.message) or "`cache`" in str(w.message)]
    assert not cache_warnings, cache_warnings
    assert decoder.cache_keyword == cache_keyword(model)
    expected = _greedy_without_cache(model, prompt, 5)
    assert [int(decoder.first_token)] + decoder.last_tokens == expected


def test_greedy_decoder_compiles_dense_inductor_with_the_decode_options():
    """The dense decoder runs Inductor on a backend object of its own with ``decode_compile_options``
    (guard filter and Inductor's assert switches as config patches), and decodes the cache-free tokens."""
    from torch._inductor.utils import run_and_get_code

    model = tiny_llama(layers=1)
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    decoder = GreedyDecoder(model, "inductor", prompt_len=8, new_tokens=4, prompt=prompt)
    _, code = run_and_get_code(decoder.tokens_per_s)
    assert code and all("assert_size_stride(" not in c for c in code)  # the options reached Inductor
    assert [int(decoder.first_token)] + decoder.last_tokens == _greedy_without_cache(model, prompt, 4)


def test_greedy_decoder_runs_repeat_from_the_prefilled_cache():
    decoder = GreedyDecoder(tiny_llama(layers=1), "eager", prompt_len=8, new_tokens=5)
    decoder.tokens_per_s()
    first = decoder.last_tokens
    decoder.tokens_per_s()
    assert decoder.last_tokens == first and len(first) == 5
    decoder.tokens_per_s(2)
    assert decoder.last_tokens == first[:2]
