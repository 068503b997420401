"""Calibration data: sources (files, JSONL, directories, the built-in mix) mixed by weight, windows
spread over each source, sizes from the model, and the record a calibrated artifact keeps."""
import json

import pytest
import torch

from splice.errors import ConfigError, SpliceError
from splice.eval import corpus
from splice.eval.calibration import calibration_data, calibration_size, text_calibration
from splice.eval.data import ByteTokenizer, builtin_text
from zoo_graphs import captured

BYTES = ByteTokenizer()


@pytest.fixture(scope="module")
def llama():
    return captured("llama")[1]


def sources(*specs):
    return corpus.load_sources([str(s) for s in specs])


def test_spec_weights():
    assert corpus.parse_spec("a.txt:2.5") == ("a.txt", 2.5)
    assert corpus.parse_spec("a.txt") == ("a.txt", 1.0)
    assert corpus.parse_spec("builtin:0.5") == ("builtin", 0.5)
    assert corpus.parse_spec("c:/data/x.txt") == ("c:/data/x.txt", 1.0)  # not a number after the colon
    for bad in ("a.txt:-1", "a.txt:inf", "a.txt:nan"):
        with pytest.raises(ConfigError, match="non-negative"):
            corpus.parse_spec(bad)


def test_existing_path_with_colon_is_a_path(tmp_path):
    path = tmp_path / "notes:2"
    path.write_text("words " * 50)
    (src,) = sources(path)
    assert src.name == str(path) and src.weight == 1.0


def test_jsonl_directory_and_file(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("alpha " * 20)
    (tmp_path / "d" / "sub" / "b.md").write_text("beta " * 20)
    (tmp_path / "d" / "c.jsonl").write_text('{"text": "gamma"}\n\n{"text": "delta", "id": 3}\n')
    (tmp_path / "d" / "blob.bin").write_bytes(b"\x00\x01" * 10)  # binary: skipped
    (tmp_path / "d" / ".hidden.txt").write_text("hidden")
    (d,) = sources(f"{tmp_path / 'd'}:3")
    assert d.weight == 3 and d.files == 3 and d.documents == 4
    assert [c.document.rsplit("/", 1)[-1] for c in d.chunks] == ["a.txt", "c.jsonl:1", "c.jsonl:3", "b.md"]


@pytest.mark.parametrize("line, needle", [('{"txt": "x"}', 'no "text" field'), ("[1, 2]", 'no "text" field'),
                                          ('{"text": 5}', "not a string"), ("{oops", "not JSON")])
def test_jsonl_bad_lines_name_file_and_line(tmp_path, line, needle):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(SpliceError, match=needle) as e:
        sources(path)
    assert f"{path}:2:" in str(e.value) and "\n" not in str(e.value)


def test_directory_without_text(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.bin").write_bytes(b"\x00" * 8)
    for d in ("empty", "bin"):
        with pytest.raises(SpliceError, match="no text file"):
            sources(tmp_path / d)


def test_weights_must_sum_to_something_positive(tmp_path):
    (tmp_path / "a.txt").write_text("words " * 50)
    with pytest.raises(ConfigError, match="sum to 0"):
        sources(f"{tmp_path / 'a.txt'}:0", f"{tmp_path / 'a.txt'}:0.0")


def test_builtin_mix_is_found_and_listed():
    mix = corpus.load_source("builtin:2")
    names = [s.name for s in mix]
    assert "builtin:python-help" in names and all(n.startswith("builtin:") for n in names)
    assert sum(s.weight for s in mix) == pytest.approx(2.0)
    assert all(s.chars <= corpus.BUILTIN_CHARS + corpus.CHUNK_CHARS and s.chunks for s in mix)


def test_roff_to_text():
    page = '.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list \\fBdirectory\\fR contents\n.B \\-a\n'
    assert corpus.roff_text(page) == "NAME\nls - list directory contents\n-a"


def test_windows_cover_the_whole_text(llama):
    text = "".join(f"{i:05d} " for i in range(4000))  # 24,000 bytes
    calib = text_calibration(llama, text, 8, 64, tokenizer=BYTES)
    starts = [int(bytes(s[0][0].tolist()).decode().split(" ")[1]) for s in calib]
    assert len(calib) == 8 and all(s[0].shape == (1, 64) for s in calib)
    # one window in each eighth of the text: spread over all of it, in order, not overlapping
    assert all(k * 500 - 1 <= start < (k + 1) * 500 for k, start in enumerate(starts)), starts
    again = text_calibration(llama, text, 8, 64, tokenizer=BYTES)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(calib, again))  # seeded


def test_mix_shares_and_record(llama, tmp_path):
    (tmp_path / "a.txt").write_text("a" * 5000)
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": f"doc{i} " + "b" * 300}) + "\n" for i in range(20)))
    calib = calibration_data(llama, sources(f"{tmp_path / 'a.txt'}:1", f"{tmp_path / 'b.jsonl'}:3"), 8, 128,
                             tokenizer=BYTES)
    firsts = [chr(int(s[0][0, 10])) for s in calib]
    assert firsts.count("a") == 2 and firsts.count("b") == 6
    r = calib.record
    assert r["samples"] == 8 and r["tokens"] == 8 * 128 and r["seq_len"] == 128
    a, b = r["sources"]
    assert (a["samples"], b["samples"]) == (2, 6) and a["documents_used"] == 1
    assert 6 <= b["documents_used"] <= 20 and all(u.startswith(f"{tmp_path / 'b.jsonl'}:") for u in b["used"])
    assert r["documents"] == a["documents_used"] + b["documents_used"]


def test_too_little_text_names_the_source(llama, tmp_path):
    (tmp_path / "short.txt").write_text("tiny text " * 10)
    with pytest.raises(SpliceError, match=r"short.txt has 10\d tokens, need 256"):
        calibration_data(llama, sources(tmp_path / "short.txt"), 2, 128, tokenizer=BYTES)


def test_default_sizes_follow_the_model(llama):
    # the zoo llama: 128 positions, widest linear 128 input features -> 32 tokens a feature
    assert calibration_size(llama) == (32, 128)
    assert calibration_size(llama, seq_len=64) == (64, 64)
    assert calibration_size(llama, 3, 16) == (3, 16)
    with pytest.raises(ConfigError, match="n_samples must be >= 1"):
        calibration_size(llama, 0)


def test_builtin_calibrates_a_text_model(llama):
    calib = calibration_data(llama, corpus.load_sources(["builtin"]), 10, 64, tokenizer=BYTES)
    r = calib.record
    assert len(calib) == 10 and sum(s["samples"] for s in r["sources"]) == 10
    assert all(s["name"].startswith("builtin:") and s["files"] >= 1 for s in r["sources"])


def test_pydoc_text_still_works(llama):
    calib = text_calibration(llama, builtin_text("pydoc"), 4, 32, tokenizer=BYTES)
    assert len(calib) == 4 and calib.record["sources"][0]["name"] == "text"


def test_default_count_takes_what_a_short_source_has(llama, tmp_path):
    (tmp_path / "short.txt").write_text("x" * 1000)  # 1,000 tokens: 7 windows of 128 (the default wants 32)
    calib = calibration_data(llama, sources(tmp_path / "short.txt"), tokenizer=BYTES)
    assert len(calib) == 7 and calib.record["samples"] == 7 and calib.record["tokens"] == 7 * 128
    (tmp_path / "tiny.txt").write_text("x" * 100)  # not one window
    with pytest.raises(SpliceError, match="tiny.txt has 10\\d tokens, need 4,096"):
        calibration_data(llama, sources(tmp_path / "tiny.txt"), tokenizer=BYTES)


def test_a_large_source_is_read_in_part_and_spread(llama, tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    for i in range(400):
        (d / f"doc{i:03d}.txt").write_text(f"document {i:03d}. " * 400)  # 400 x 6,800 bytes
    calib = calibration_data(llama, sources(d), 8, 64, tokenizer=BYTES)
    used = calib.record["sources"][0]["used"]
    assert len(calib) == 8 and len(used) == 8  # one document per window (each is longer than a window)
    numbers = sorted(int(u.rsplit("doc", 1)[1][:3]) for u in used)
    assert numbers[-1] - numbers[0] > 100  # from across the directory, not its first files
