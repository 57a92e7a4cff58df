"""benchmarks/weight_subclass_cost.py: the hypothetical float-weight subclass computes what the strided
view computes, eagerly and compiled, and the dry run writes its records."""

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import weight_subclass_cost
from benchmarks.harness import RESULT_KEYS


def test_the_subclass_is_the_same_weight_as_the_strided_view():
    weight = torch.randn(12, 8)
    wrapped = weight_subclass_cost.InputMajorWeight(weight.t().contiguous())
    assert wrapped.shape == weight.shape and wrapped.stride() == (1, 12)
    x = torch.randn(3, 8)
    torch.testing.assert_close(F.linear(x, wrapped), F.linear(x, weight))


def test_dry_run_writes_eager_and_compiled_records(tmp_path):
    result = weight_subclass_cost.main(["--dry-run", "--out-dir", str(tmp_path)])
    data = json.loads(Path(result["path"]).read_text())
    assert set(RESULT_KEYS) == data.keys() and data["dry_run"] is True
    cases = [r["case"] for r in data["records"]]
    assert cases.count("eager F.linear, batch 1") == len(weight_subclass_cost.SHAPES)
    assert cases[-1] == "compiled step of 8 linears"
    for r in data["records"]:
        assert r["plain_us"] > 0 and r["subclass_us"] > 0
        assert abs(r["added_us"] - (r["subclass_us"] - r["plain_us"])) < 1e-9
