"""wisparse_compile/data.py: models and text from local files."""

import pytest
import torch

from wisparse_compile.data import (
    domain_texts, load_causal_lm, random_causal_lm, read_text, split_articles, token_windows,
)


class _WordTokenizer:
    """One id per whitespace-separated word (the word's length), EOS = 0."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(w) for w in text.split()]}


def test_token_windows_join_texts_by_eos_and_cut_whole_windows():
    windows = token_windows(_WordTokenizer(), ["a bb ccc", "dddd eeeee"], 3)
    assert [w.tolist() for w in windows] == [[[1, 2, 3]], [[0, 4, 5]]]  # the trailing EOS is no whole window
    assert [w.tolist() for w in token_windows(_WordTokenizer(), ["a bb ccc dddd"], 2, max_tokens=3)] == [[[1, 2]]]


def test_token_windows_refuse_too_little_text_and_tiny_windows():
    with pytest.raises(ValueError, match="fewer than one window of 8"):
        token_windows(_WordTokenizer(), ["a b"], 8)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        token_windows(_WordTokenizer(), ["a b c"], 1)


def test_read_text_splits_documents_on_two_blank_lines(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("first doc\nstill first\n\n\n\nsecond doc\n\nstill second\n")
    assert read_text(path) == ["first doc\nstill first", "second doc\n\nstill second"]
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no text"):
        read_text(tmp_path / "empty.txt")


def test_split_articles_halves_in_order():
    assert split_articles(["a", "b", "c", "d", "e"]) == (["a", "b"], ["c", "d", "e"])


def test_random_model_is_tiny_and_seeded():
    model, tokenizer = random_causal_lm("llama")
    again, _ = random_causal_lm("llama")
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    assert tokenizer.chat_template and len(tokenizer("hi")["input_ids"]) >= 2
    with pytest.raises(ValueError, match="unknown transformers model type 'no-such-model'"):
        random_causal_lm("no-such-model")


def test_load_causal_lm_names_what_it_accepts(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a model folder, a .gguf file, 'smollm2' nor random"):
        load_causal_lm(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_causal_lm(str(tmp_path / "missing.gguf"))
    model, tokenizer = load_causal_lm("random:llama", dtype=torch.bfloat16, tokenizer=False)
    assert tokenizer is None and next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("domain", ["news", "newsgroups", "python-docs"])
def test_other_text_domains_load_as_prose(domain):
    docs = domain_texts(domain)
    assert len(docs) >= 50 and all(isinstance(d, str) and d == d.strip() and d for d in docs)
    assert sum(len(d) for d in docs) > 300_000  # enough for 4096-token evaluations
    if domain == "newsgroups":  # mail headers dropped: bodies only
        assert not any(d.startswith(("From:", "Newsgroups:", "Xref:", "Path:")) for d in docs)


def test_unknown_domain_names_the_known_ones():
    with pytest.raises(ValueError, match="known: \\['wikipedia', 'news'"):
        domain_texts("poetry")
