"""`splice run --calib`: sources mixed by weight (files, JSONL, directories, builtin), sizes, the
record in the artifact, the token floor (warning) and hard minimum (refusal), bad sources."""
import json
from dataclasses import dataclass

import pytest
import torch
from zoo_graphs import assert_error, run_cli

from splice.passes import base


@dataclass(frozen=True, kw_only=True)
class _CalibConfig(base.PassConfig):
    """Test pass that records the calibration batches it is given."""


@pytest.fixture
def calib_pass(monkeypatch):
    seen = []

    def fn(graph, cfg, ctx):
        seen.append(ctx.calibration)
        return base.PassResult(graph, False, {})

    info = base.PassInfo("test.calib", _CalibConfig, fn, "https://example.org", True, 1)
    monkeypatch.setitem(base._REGISTRY, "test.calib", info)
    return seen


@pytest.fixture
def mix(tmp_path):
    """A text file, a JSONL file and a directory (of a text file and a JSONL file)."""
    (tmp_path / "notes.txt").write_text("plain notes. " * 400)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": f"row {i}. " * 60}) + "\n" for i in range(30)))
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.txt").write_text("directory text. " * 300)
    (tmp_path / "dir" / "b.jsonl").write_text(json.dumps({"text": "more. " * 300}) + "\n")
    return tmp_path


def test_calibration_required_before_capture(capsys, no_capture, calib_pass, llama_hf_dir, tmp_path):
    out = tmp_path / "out"
    assert_error(capsys, ["run", llama_hf_dir, "-p", "test.calib", "-o", out], "test.calib", "--calib",
                 absent=[out])


def test_calibration_batches(capsys, byte_tokenizer, calib_pass, calib_text, llama_hf_dir, tmp_path):
    out = tmp_path / "out"
    rc, stdout, err = run_cli(capsys, "run", llama_hf_dir, "-p", "test.calib", "--calib", calib_text,
                              "--calib-samples", 4, "--calib-seqlen", 32, "-o", out)
    assert rc == 0, err
    (batches,) = calib_pass
    assert len(batches) == 4
    ids, mask = batches[0]  # graph.input_names order: input_ids, attention_mask
    assert ids.shape == mask.shape == (1, 32) and ids.dtype == torch.long and bool((mask == 1).all())
    assert "4 samples × 32 tokens = 128 tokens from 1 documents" in stdout
    # 128 tokens for the widest layer's 128 input features: runs, with a one-line warning
    warning = [line for line in err.splitlines() if line.startswith("splice: warning: ")]
    assert len(warning) == 1 and "1.0 per input feature" in warning[0] and "down_proj" in warning[0]
    out2 = tmp_path / "out2"  # too little text: one line, nothing written
    assert_error(capsys, ["run", llama_hf_dir, "-p", "test.calib", "--calib", calib_text, "--calib-samples", 64,
                          "-o", out2], "tokens, need 8,192", absent=[out2])


def test_below_the_hard_minimum_is_refused(capsys, byte_tokenizer, calib_pass, calib_text, llama_hf_dir, tmp_path):
    out = tmp_path / "out"
    assert_error(capsys, ["run", llama_hf_dir, "-p", "test.calib", "--calib", calib_text, "--calib-samples", 2,
                          "--calib-seqlen", 32, "-o", out], "test.calib", "64 calibration tokens",
                 "128 input features", absent=[out])
    assert not calib_pass


def test_mixed_sources_recorded_in_the_artifact(capsys, byte_tokenizer, calib_pass, mix, llama_hf_dir):
    out = mix / "out"
    rc, stdout, err = run_cli(capsys, "run", llama_hf_dir, "-p", "test.calib", "--calib", f"{mix / 'notes.txt'}:1",
                              "--calib", f"{mix / 'rows.jsonl'}:2", "--calib", mix / "dir", "--calib-seqlen", 64,
                              "-o", out)
    assert rc == 0, err
    assert "warning" not in err  # default size: 32 tokens per input feature
    (batches,) = calib_pass
    assert len(batches) == 64 and batches[0][0].shape == (1, 64)
    entry = json.loads((out / "manifest.json").read_text())["passes"][0]
    record = entry["calibration"]
    assert record["tokens"] == 64 * 64 and record["tokens_per_feature"] == 32.0
    assert record["widest_layer"] == {"path": "model.layers.0.mlp.down_proj", "in_features": 128}
    assert [(s["name"].rsplit("/", 1)[-1], s["samples"]) for s in record["sources"]] == \
        [("notes.txt", 16), ("rows.jsonl", 32), ("dir", 16)]
    assert record["sources"][2]["files"] == 2 and record["documents"] >= 4
    assert f"64 samples × 64 tokens = 4,096 tokens from {record['documents']} documents" in stdout


def test_builtin(capsys, byte_tokenizer, calib_pass, llama_hf_dir, tmp_path):
    rc, stdout, err = run_cli(capsys, "run", llama_hf_dir, "-p", "test.calib", "--calib", "builtin",
                              "--calib-samples", 10, "--calib-seqlen", 64, "-o", tmp_path / "out")
    assert rc == 0, err
    record = json.loads((tmp_path / "out" / "manifest.json").read_text())["passes"][0]["calibration"]
    assert all(s["name"].startswith("builtin:") and s["files"] for s in record["sources"])
    samples = {s["name"]: s["samples"] for s in record["sources"]}  # equal shares of the sources this machine has
    assert sum(samples.values()) == 10 and max(samples.values()) - min(samples.values()) <= 1
    assert f"builtin:python-help ({samples['builtin:python-help']})" in stdout


@pytest.mark.parametrize("make, spec, needles", [
    (lambda d: (d / "a.txt").write_text("text " * 100), ["a.txt:0"], ["weights sum to 0"]),
    (lambda d: (d / "a.jsonl").write_text('{"text": "ok"}\n{"body": "no"}\n'), ["a.jsonl"],
     ["a.jsonl:2", 'no "text" field']),
    (lambda d: (d / "empty").mkdir(), ["empty"], ["empty", "no text file"]),
    (lambda d: (d / "a.txt").write_text("text " * 100), ["a.txt:-2"], ["a.txt:-2", "non-negative"]),
])
def test_bad_sources_fail_before_capture(capsys, no_capture, calib_pass, llama_hf_dir, tmp_path, make, spec, needles):
    make(tmp_path)
    argv = ["run", llama_hf_dir, "-p", "test.calib", "-o", tmp_path / "out"]
    for s in spec:
        argv += ["--calib", f"{tmp_path}/{s}"]
    assert_error(capsys, argv, *needles, absent=[tmp_path / "out"])
