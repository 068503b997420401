"""`splice eval`: perplexity from the command line, the per-layer table, and one-line errors.

The tiny zoo HF directories carry no tokenizer, so most tests patch
``splice.ir.tokenizer.load_tokenizer`` to the byte tokenizer (conftest's ``byte_tokenizer``).
"""

import math

import pytest
from zoo_graphs import assert_error, run_cli

import splice
from splice import cli
from splice.eval.data import ByteTokenizer, builtin_text
from splice.eval.perplexity import perplexity

TEXT = builtin_text("gpl3")[:3000]


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture(scope="module")
def int3_artifact(llama_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "llama-int3"
    splice.capture(llama_hf_dir).apply("quantize.rtn:bits=3,group_size=32").save(out)
    return out


def test_eval_prints_perplexity(capsys, byte_tokenizer, llama_hf_dir, text_file):
    rc, out, err = run_cli(capsys, "eval", llama_hf_dir, "--ppl", text_file, "--seq-len", 64, "--stride", 32)
    assert rc == 0, err
    assert "3,000 tokens" in out and "windows of 64, stride 32" in out and "2,999 tokens" in out
    ppl = float(out.split("perplexity ")[1].split()[0])
    expected = perplexity(splice.capture(llama_hf_dir), TEXT, tokenizer=ByteTokenizer(), seq_len=64, stride=32)
    assert ppl == pytest.approx(expected["ppl"], abs=1e-4)
    assert "reference" not in out and "sqnr" not in out.lower()


def test_eval_max_tokens(capsys, byte_tokenizer, llama_hf_dir, text_file):
    rc, out, err = run_cli(capsys, "eval", llama_hf_dir, "--ppl", text_file, "--seq-len", 64, "--max-tokens", 640)
    assert rc == 0, err
    assert "10 windows of 64, stride 64" in out and "630 tokens" in out


def test_eval_artifact_against_reference_with_layers(capsys, byte_tokenizer, llama_hf_dir, int3_artifact, text_file):
    rc, out, err = run_cli(capsys, "eval", int3_artifact, "--ppl", text_file, "--seq-len", 64, "--max-tokens", 512,
                           "--ref", llama_hf_dir, "--layers", "--layer-samples", 2)
    assert rc == 0, err
    assert "reference perplexity" in out and "vs reference: " in out
    table = out[out.index("per-layer output SQNR"):]
    assert "(2 × 64 tokens)" in " ".join(table.split())  # rich may wrap the title
    rows = [ln for ln in table.splitlines() if "splice.qlinear" in ln]
    assert len(rows) == 15 and any("lm_head" in r for r in rows)
    assert "model.layers.0.self_attn.q_proj" in table and "worst layer:" in out


def test_eval_reference_identical_gives_inf(capsys, byte_tokenizer, llama_hf_dir, text_file):
    rc, out, err = run_cli(capsys, "eval", llama_hf_dir, "--ppl", text_file, "--seq-len", 32, "--max-tokens", 64,
                           "--ref", llama_hf_dir, "--layers", "--layer-samples", 1)
    assert rc == 0, err
    assert "vs reference: +0.0000" in out and out.count(" inf ") >= 15 and "worst layer" not in out


def _ppl(line: str) -> float:
    return float(line.split("perplexity ")[1].split()[0])


def test_eval_several_files_geometric_mean(capsys, byte_tokenizer, llama_hf_dir, text_file, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(builtin_text("pydoc")[:2000])
    rc, out, err = run_cli(capsys, "eval", llama_hf_dir, "--ppl", text_file, other, "--seq-len", 64,
                           "--max-tokens", 640)
    assert rc == 0, err
    lines = out.splitlines()
    per_file = {path: _ppl(ln) for path in (text_file, other) for ln in lines if ln.startswith(f"{path}: perplexity ")}
    assert len(per_file) == 2 and out.count("10 windows of 64") == 2
    (mean_line,) = [ln for ln in lines if ln.startswith("geometric mean perplexity ")]
    assert _ppl(mean_line) == pytest.approx(math.exp(sum(map(math.log, per_file.values())) / 2), abs=1e-3)
    worst = max(per_file, key=per_file.get)
    assert "over 2 files" in mean_line and f"worst: {worst} {per_file[worst]:.4f}" in " ".join(out.split())
    assert "reference" not in out


def test_eval_several_files_against_reference(capsys, byte_tokenizer, llama_hf_dir, text_file):
    rc, out, err = run_cli(capsys, "eval", llama_hf_dir, "--ppl", text_file, "--ppl", text_file, "--seq-len", 32,
                           "--max-tokens", 64, "--ref", llama_hf_dir)
    assert rc == 0, err
    assert out.count(f"{text_file}: reference perplexity") == 2 and out.count(f"{text_file}: vs reference: ") == 2
    assert "geometric mean reference perplexity" in out and "geometric mean vs reference: +0.0000" in out


# -------------------------------------------------------------------------- errors


def test_checks_before_capture(capsys, no_capture, tmp_path, text_file, llama_hf_dir):
    assert_error(capsys, ["eval", llama_hf_dir, "--ppl", tmp_path / "nope.txt"], "nope.txt", "no such file")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert_error(capsys, ["eval", llama_hf_dir, "--ppl", empty], "empty.txt", "empty")
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"ab\x00cd")
    assert_error(capsys, ["eval", llama_hf_dir, "--ppl", binary], "not a text file")
    assert_error(capsys, ["eval", tmp_path / "missing-model", "--ppl", text_file], "missing-model", "no such file")
    assert_error(capsys, ["eval", llama_hf_dir, "--ppl", text_file, "--ref", tmp_path / "noref"], "noref")
    assert_error(capsys, ["eval", llama_hf_dir, "--ppl", text_file, "--layers"], "--ref", rc=2)
    assert_error(capsys, ["eval", llama_hf_dir, "--ppl", text_file, "--seq-len", 32, "--stride", 64],
                 "--stride 64", "--seq-len 32", rc=2)
    assert_error(capsys, ["eval", llama_hf_dir, "--ppl", text_file, tmp_path / "second.txt"],
                 "second.txt", "no such file")


def test_usage_errors(capsys):
    rc, _, err = run_cli(capsys, "eval", "model")
    assert rc == 2 and "--ppl" in err
    rc, _, err = run_cli(capsys, "eval", "model", "--ppl", "f", "--seq-len", "0")
    assert rc == 2 and "positive integer" in err
    rc, out, _ = run_cli(capsys, "eval", "--help")
    assert rc == 0 and "usage: splice eval" in out and "--layers" in out


def test_text_too_short(capsys, byte_tokenizer, llama_hf_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("hello world")
    assert_error(capsys, ["eval", llama_hf_dir, "--ppl", short, "--seq-len", 64],
                 "short.txt", "text too short", "11 tokens", "64")
    long = tmp_path / "long.txt"
    long.write_text(TEXT)
    assert_error(capsys, ["eval", llama_hf_dir, "--ppl", long, "--seq-len", 64, "--max-tokens", 10],
                 "--max-tokens 10")
    line = assert_error(capsys, ["eval", llama_hf_dir, "--ppl", long, short, "--seq-len", 64],
                        "short.txt", "text too short", "11 tokens")
    assert "long.txt" not in line


def test_model_without_logits(capsys, byte_tokenizer, zoo_hf_dir, text_file):
    bert = zoo_hf_dir("bert")
    capsys.readouterr()  # save_pretrained's progress bar
    assert_error(capsys, ["eval", bert, "--ppl", text_file], "no 'logits' output", "last_hidden_state")


def test_missing_tokenizer(capsys, llama_hf_dir, text_file):
    assert_error(capsys, ["eval", llama_hf_dir, "--ppl", text_file], "cannot load the tokenizer", str(llama_hf_dir))


def test_debug_reraises(byte_tokenizer, llama_hf_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("hi there")
    with pytest.raises(splice.SpliceError, match="text too short"):
        cli.main(["eval", str(llama_hf_dir), "--ppl", str(short), "--seq-len", "64", "--debug"])
