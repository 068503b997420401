"""bench/delta.py's smoke configuration (``--quick``: bench/merge.py's zoo-Llama fine-tunes) runs end
to end: every compressor's bytes, error and loss per domain; the rank-r SVD of a rank-r LoRA delta is
exact and keeps the whole gain; BitStack's error falls as its budget grows."""
import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[1] / "bench" / "delta.py"


def test_quick_delta_bench(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_delta", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out, doc = tmp_path / "delta.json", tmp_path / "bench_delta.md"
    assert bench.main(["--quick", "--out", str(out), "--doc", str(doc), "--cache", str(tmp_path / "cache")]) == 0
    r = json.loads(out.read_text())
    learned = 0
    for domain, entry in r["domains"].items():
        rows = entry["rows"]
        assert rows["dense (extract)"]["rel_error"] == 0 and rows["svd rank 8"]["rel_error"] < 1e-3, domain  # LoRA r=8
        assert rows["bitdelta"]["compression"] > 10 and rows["compeft density 0.1 (α = 1)"]["compression"] > 10
        stack = [rows[f"bitstack 8 levels, {p} %"]["rel_error"] for p in (25, 50, 75, 100)]
        assert stack == sorted(stack, reverse=True), (domain, stack)
        if entry["fine-tune"] < entry["base"] - 0.02:  # a fine-tune that learned its domain
            learned += 1
            assert rows["svd rank 8"]["gain_kept"] == pytest.approx(1, abs=0.01), domain
    assert learned >= 1
    assert bench.DOC_BEGIN in doc.read_text()
