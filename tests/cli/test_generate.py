"""``wisparse generate`` (``cli/generate.py``): the chat prompt's ids and the generation settings."""

import torch

from wisparse_compile.cli.generate import chat_ids, generation_kwargs


class _Tokenizer:
    pad_token_id = None
    eos_token_id = 2

    def __init__(self, as_mapping: bool) -> None:
        self.as_mapping = as_mapping
        self.messages = None

    def apply_chat_template(self, messages, add_generation_prompt, return_tensors):
        assert add_generation_prompt and return_tensors == "pt"
        self.messages = messages
        ids = torch.tensor([[5, 6, 7]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)} if self.as_mapping else ids


def test_chat_ids_of_a_one_turn_chat_either_return_type():
    for as_mapping in (True, False):
        tokenizer = _Tokenizer(as_mapping)
        assert torch.equal(chat_ids(tokenizer, "hi"), torch.tensor([[5, 6, 7]]))
        assert tokenizer.messages == [{"role": "user", "content": "hi"}]


def test_greedy_static_cache_compiled_with_wisparse_or_not_at_all():
    compiled = generation_kwargs(_Tokenizer(True), 4, compile=True)
    assert (compiled["max_new_tokens"], compiled["do_sample"], compiled["cache_implementation"]) == (4, False, "static")
    assert compiled["pad_token_id"] == 2  # no pad token: the end-of-sequence one
    config = compiled["compile_config"]
    assert config.backend == "wisparse" and config.fullgraph is False and config._compile_all_devices
    eager = generation_kwargs(_Tokenizer(True), 4, compile=False)
    assert eager["disable_compile"] is True and "compile_config" not in eager
