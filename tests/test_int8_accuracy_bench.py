"""``benchmarks/int8_accuracy.py`` in its quick mode: every weight format and plan it compares, one table."""


def test_int8_accuracy_script_quick_mode(tmp_path):
    from benchmarks import int8_accuracy

    result = int8_accuracy.main(["--dry-run", "--out-dir", str(tmp_path)])
    results = {r["key"]: r for r in result["records"]}
    assert list(results) == [
        "fp32 dense", "int8 dense", "int8 + teal@0.5", "int8 + wisparse@0.5",
        "int4 dense", "int4 dense, float head", "int4 + teal@0.5", "int4 + wisparse@0.5",
    ]
    assert results["int4 dense, float head"]["head"] is None and results["int4 dense, float head"]["quantized"] == 14
    for fmt in ("int8", "int4"):
        assert results[f"{fmt} dense"]["quantized"] == 15 and results[f"{fmt} dense"]["head"] == "lm_head"
    fp, q8, q4 = (results[k]["perplexity"] for k in ("fp32 dense", "int8 dense", "int4 dense"))
    assert q8 != fp and abs(q8 / fp - 1) < 0.01  # int8 changes the model, and only slightly
    assert q4 != q8 and abs(q4 / fp - 1) < 0.1  # int4: coarser, still close on a random tiny model
    sparse = [k for k in results if "@" in k]
    assert all(0.3 < results[k]["achieved_sparsity"] < 0.7 for k in sparse)
    table = (tmp_path / "int8_accuracy" / "dry-run" / f"{result['date']}.md").read_text()
    assert "| int8 | teal 0.5 |" in table and "| int4 | wisparse 0.5 |" in table
