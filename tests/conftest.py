"""Test set-up: Triton runs in its CPU interpreter; Inductor uses a fresh cache per session."""

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="wisparse-inductor-"))

import pytest  # noqa: E402
import torch  # noqa: E402


def tiny_llama(seed: int = 0, layers: int = 2):
    """A small random Llama (hidden 64, 2 layers, vocab 256) in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def token_batches(n: int, batch: int = 2, length: int = 32, seed: int = 1, vocab: int = 256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, length), generator=g) for _ in range(n)]


def calibrated_llama(seed: int = 0, sparsity: float = 0.5, method: str = "wina"):
    """``tiny_llama(seed)`` with a plan calibrated on 4 batches attached: (model, plan)."""
    import wisparse_compile as wsc

    model = tiny_llama(seed)
    plan = wsc.calibrate(model, token_batches(4, seed=seed + 10), wsc.SparsityConfig(sparsity=sparsity, method=method))
    wsc.attach(model, plan)
    return model, plan


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def wina_plan():
    """A uniform 50% WINA plan of ``tiny_llama()`` (calibrated once per test module)."""
    import wisparse_compile as wsc

    return wsc.calibrate(tiny_llama(), token_batches(2), wsc.SparsityConfig(sparsity=0.5, method="wina", allocation=wsc.Uniform()))
