"""`splice` command: hostile inputs get one short line, outputs are checked before any capture,
export targets and train options come from their registries, and start-up imports nothing heavy."""
import dataclasses
import json
import subprocess
import sys

import pytest
from zoo_graphs import assert_error, run_cli

from splice.cli.ui import ECHO_LIMIT, one_line
from splice.runtime import targets
from splice.train.config import TrainConfig

RTN = "quantize.rtn:bits=4,group_size=32"
# a billion laughs: nine levels of ten aliases each (the 25 MB error line of issue 13)
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)) + "passes: *i\n"


def fake_artifact(path):
    path.mkdir()
    (path / "manifest.json").write_text(json.dumps({"format": "splice-artifact"}))
    return path


# ------------------------------------------------------------------------ the error line


def test_one_line_caps_what_it_echoes():
    line = one_line("first\n  second\n" + "x" * 10_000_000)
    assert "\n" not in line and line.startswith("first second x")
    assert len(line) < ECHO_LIMIT + 50 and "10,000,015 characters, cut" in line
    assert one_line("short\nmessage") == "short message"
    assert one_line("") == "(no message)"


def test_alias_bomb_recipe_is_one_short_line(capsys, no_capture, llama_hf_dir, tmp_path):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(ALIAS_BOMB)
    out = tmp_path / "out"
    line = assert_error(capsys, ["run", llama_hf_dir, "--recipe", recipe, "-o", out], "bomb.yaml", absent=[out])
    assert len(line) < ECHO_LIMIT + 100, len(line)


def test_huge_pass_name_is_one_short_line(capsys, no_capture, llama_hf_dir, tmp_path):
    line = assert_error(capsys, ["run", llama_hf_dir, "-p", "q" * 1_000_000, "-o", tmp_path / "out"], "unknown pass")
    assert len(line) < ECHO_LIMIT + 100, len(line)


def test_huge_bad_value_usage_error_is_capped(capsys):
    rc, _, err = run_cli(capsys, "run", "m", "-o", "o", "--calib-samples", "9" * 100 + "x" * 1_000_000)
    assert rc == 2 and "positive integer" in err and len(err) < 2000, len(err)
    rc, _, err = run_cli(capsys, "passes", "quantize.rtn", "y" * 1_000_000)
    assert rc == 2 and "unrecognized arguments" in err and len(err) < 2000, len(err)


def test_recipe_directory_is_named_as_such(capsys, no_capture, llama_hf_dir, tmp_path):
    line = assert_error(capsys, ["run", llama_hf_dir, "--recipe", tmp_path, "-o", tmp_path / "out"],
                        "--recipe", str(tmp_path), "is a directory")
    assert "no such file" not in line


# ------------------------------------------------------------ outputs, before any capture


def test_symlinked_output_refused_before_capture(capsys, no_capture, llama_hf_dir, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    assert_error(capsys, ["run", llama_hf_dir, "-p", RTN, "-o", link, "--force"], "link", "symbolic link")
    assert list(real.iterdir()) == [] and link.is_symlink()


def test_output_under_a_file_refused_before_capture(capsys, no_capture, llama_hf_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_error(capsys, ["run", llama_hf_dir, "-p", RTN, "-o", blocker / "out"], "not a directory")
    assert_error(capsys, ["train", llama_hf_dir, "--data", blocker, "-p", "adapter.lora", "-o", blocker / "out"],
                 "not a directory")


def test_export_into_its_own_artifact_refused(capsys, no_capture, tmp_path):
    art = fake_artifact(tmp_path / "art")
    program = art / "program.pt2"
    program.write_bytes(b"mine")
    assert_error(capsys, ["export", art, "--onnx", program, "--force"], "program.pt2", "inside")
    assert_error(capsys, ["export", art, "--onnx", art / "sub" / "m.onnx"], "inside the input")
    assert program.read_bytes() == b"mine" and not (art / "sub").exists()


# ------------------------------------------------------------------ registries drive flags


def test_export_flags_come_from_the_target_registry(capsys, monkeypatch, llama_hf_dir, tmp_path):
    written = []

    def export(graph, path):
        path.write_text(f"{len(graph.layers())} layers")
        (path.parent / (path.name + ".side")).write_text("side")
        written.append(path.name)

    fake = targets.ExportTarget("fake", "--fake", "a test target", export)
    monkeypatch.setitem(targets._TARGETS, "fake", fake)
    rc, out, _ = run_cli(capsys, "export", "--help")
    assert rc == 0 and "--fake FILE" in out and "--onnx FILE" in out
    dest = tmp_path / "model.fake"
    rc, out, err = run_cli(capsys, "export", llama_hf_dir, "--fake", dest)
    assert rc == 0, err
    assert dest.read_text().endswith("layers") and (tmp_path / "model.fake.side").is_file()
    assert written == ["model.fake"] and "model.fake.side" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.fake", "model.fake.side"]
    assert_error(capsys, ["export", llama_hf_dir, "--fake", tmp_path / "x", "--check"], "--check", "fake")
    rc, _, err = run_cli(capsys, "export", llama_hf_dir, "--fake", dest, "--onnx", tmp_path / "m.onnx", "--force")
    assert rc == 2 and "not allowed with" in err
    with pytest.raises(Exception, match="already registered"):
        targets.register_target(fake)


def test_train_flags_come_from_train_config(capsys):
    rc, out, _ = run_cli(capsys, "train", "--help")
    assert rc == 0
    text = " ".join(out.split())
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert f"(default {f.default})" in text, f.name
        assert " ".join(f.metadata["help"].split()) in text, f.name
    rc, _, err = run_cli(capsys, "train", "m", "--data", "d", "-o", "o", "--loss", "ranking")
    assert rc == 2 and "invalid choice" in err
    rc, _, err = run_cli(capsys, "train", "m", "--data", "d", "-o", "o", "--steps", "0")
    assert rc == 2 and "positive integer" in err


# ---------------------------------------------------------------------- cheap start-up

HEAVY = ("torch", "onnx", "onnxscript", "onnxruntime", "transformers", "triton", "scipy")


def imported_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint('imported:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return [m for m in proc.stdout.strip().splitlines()[-1].removeprefix("imported:").split(",") if m]


@pytest.mark.parametrize("argv", [[], ["passes"], ["inspect"], ["run"], ["export"], ["eval"], ["train"], ["demo"]])
def test_help_imports_nothing_heavy(argv):
    code = (f"import contextlib, io\nfrom splice.cli import main\nwith contextlib.redirect_stdout(io.StringIO()):\n"
            f"    assert main({argv + ['--help']!r}) == 0")
    assert imported_after(code) == []


def test_import_splice_and_the_pass_registry_stay_light():
    assert imported_after("import splice") == []
    assert imported_after("import splice.passes") == ["torch"]


def test_python_dash_m_splice():
    proc = subprocess.run([sys.executable, "-m", "splice", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: splice" in proc.stdout and proc.stderr == ""
