"""``model_io.cache_keyword``: the KV cache's keyword read from the forward's declared parameters."""

import functools
import warnings

import pytest
import torch
from torch import nn

from tests.conftest import tiny_llama
from wisparse_compile.model_io import cache_keyword


class _Renamed(nn.Module):
    def forward(self, input_ids, cache=None, use_cache=None):
        return input_ids


class _Old(nn.Module):
    def forward(self, input_ids, past_key_values=None, use_cache=None):
        return input_ids


class _Both(nn.Module):
    def forward(self, input_ids, cache=None, past_key_values=None):
        return input_ids


class _Neither(nn.Module):
    def forward(self, input_ids, **kwargs):
        return input_ids


def _renaming(forward):
    """What transformers' ``deprecate_kwarg("past_key_values", new_name="cache")`` does: a wraps()'d wrapper."""

    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        if "past_key_values" in kwargs:
            kwargs["cache"] = kwargs.pop("past_key_values")
        return forward(*args, **kwargs)

    return wrapped


class _Decorated(nn.Module):
    @_renaming
    def forward(self, input_ids, cache=None):
        return input_ids


@pytest.mark.parametrize("module,keyword", [
    (_Renamed, "cache"), (_Decorated, "cache"),  # the decorator's (*args, **kwargs) is looked through
    (_Old, "past_key_values"), (_Both, "past_key_values"), (_Neither, "past_key_values"),
])
def test_cache_keyword_is_the_name_the_forward_declares(module, keyword):
    assert cache_keyword(module()) == keyword


def test_the_installed_transformers_llama_fills_a_cache_passed_under_its_keyword_without_a_warning():
    """Llama takes ``cache`` from transformers' rename on (5.24 here; the old name warns) and
    ``past_key_values`` before it (5.17): whichever the installed one declares, the cache is filled."""
    from transformers import DynamicCache

    model = tiny_llama(layers=1)
    cache = DynamicCache(config=model.config)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache})
    assert not [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert cache.get_seq_length() == 6
