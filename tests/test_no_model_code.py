"""The package names no architecture or projection: it works on any model by dataflow alone."""

from __future__ import annotations

import pathlib
import re

import wisparse_compile

FORBIDDEN = re.compile(
    r"llama|mistral|mixtral|qwen|gemma|phi-?\d|\bphi\b|gpt|\bopt\b|neox|falcon|bloom|olmo|cohere|granite|"
    r"stablelm|deepseek|\b[qkvo]_proj\b|gate_proj|up_proj|down_proj|gate_up_proj|qkv_proj|c_attn|c_proj|c_fc|"
    r"query_key_value|dense_h_to_4h|dense_4h_to_h|lm_head|embed_tokens|\bwte\b|conv1d",
    re.IGNORECASE,
)


def test_package_source_names_no_architecture():
    root = pathlib.Path(wisparse_compile.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) >= 10
    hits = [
        f"{path.relative_to(root)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if FORBIDDEN.search(line)
    ]
    assert not hits, "architecture-specific names in the package:\n" + "\n".join(hits)
