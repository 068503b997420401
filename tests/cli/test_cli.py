"""The `splice` command: every subcommand, and every bad input gives one clean error line.

Commands run in-process through ``splice.cli.main`` (fast); one test runs the installed
console script. A bad input must give a non-zero exit, exactly one stderr line
``splice: error: ...`` naming the culprit, no traceback, and no output left behind.
"""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from zoo_graphs import assert_error, run_cli

import splice
from splice import cli
from splice.errors import CaptureError, ConfigError, ExportError
from splice.passes import base
from splice.runtime.onnx import export_onnx

RTN = "quantize.rtn:bits=4,group_size=32"


@pytest.fixture(scope="module")
def artifact(llama_hf_dir, tmp_path_factory):
    """The tiny llama quantized by `splice run` (path, stdout of the run)."""
    out = tmp_path_factory.mktemp("art") / "llama-int4"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["run", str(llama_hf_dir), "-p", RTN, "-o", str(out)])
    assert rc == 0, buf.getvalue()
    return out, buf.getvalue()


def broken_copy(artifact, tmp_path, how):
    art = tmp_path / "art"
    shutil.copytree(artifact[0], art)
    if how == "edited manifest":
        m = json.loads((art / "manifest.json").read_text())
        m["params"] += 1
        (art / "manifest.json").write_text(json.dumps(m, indent=2))
        return art, "manifest.json"
    name = "program.pt2" if how == "truncated program" else "manifest.json"
    data = (art / name).read_bytes()
    (art / name).write_bytes(data[: len(data) // 2])
    return art, name


# ---------------------------------------------------------------------------- passes


def test_passes_lists_every_pass(capsys):
    rc, out, err = run_cli(capsys, "passes")
    assert rc == 0 and err == ""
    lines = out.strip().splitlines()
    assert len(lines) == len(base.list_passes())
    rtn = next(ln for ln in lines if ln.startswith("quantize.rtn "))
    assert "Round-to-nearest" in rtn and "https://arxiv.org/abs/2208.07339" in rtn


def test_passes_shows_options(capsys):
    rc, out, _ = run_cli(capsys, "passes", "quantize.rtn")
    assert rc == 0
    rows = {ln.split("│")[0].strip(): ln for ln in out.splitlines() if "│" in ln}
    assert set(rows) >= {"bits", "group_size", "symmetric", "targets"}
    assert "int" in rows["bits"] and "4" in rows["bits"] and "bool" in rows["symmetric"]
    assert "needs calibration: no" in out and "arxiv.org" in out


def test_console_script_passes():
    exe = Path(sys.executable).with_name("splice")
    exe = str(exe) if exe.exists() else shutil.which("splice")
    assert exe, "the `splice` console script is not installed"
    proc = subprocess.run([exe, "passes"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "quantize.rtn" in proc.stdout and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv", [[], ["passes"], ["inspect"], ["run"], ["export"]])
def test_help(capsys, argv):
    rc, out, _ = run_cli(capsys, *argv, "--help")
    assert rc == 0 and "usage: splice" in out


def test_usage_errors_exit_2(capsys):
    rc, _, err = run_cli(capsys, "run", "model")  # no -o
    assert rc == 2 and "-o/--output" in err
    rc, _, err = run_cli(capsys, "frobnicate")
    assert rc == 2 and "invalid choice" in err
    assert_error(capsys, ["run", "model", "-o", "out"], "-p", "--recipe", rc=2)


def test_debug_reraises_and_internal_errors_are_one_line(capsys, monkeypatch):
    with pytest.raises(ConfigError):
        cli.main(["--debug", "passes", "quantize.rnt"])
    monkeypatch.setattr(base, "list_passes", lambda: 1 / 0)
    rc, out, err = run_cli(capsys, "passes")
    assert rc == 1 and "Traceback" not in err
    assert err.strip() == ("splice: internal error: ZeroDivisionError: division by zero "
                           "(rerun with --debug for the traceback)")
    with pytest.raises(ZeroDivisionError):
        cli.main(["passes", "--debug"])


def test_demo_is_optional(capsys):
    try:
        import splice.demo  # noqa: F401
    except ModuleNotFoundError:
        assert_error(capsys, ["demo"], "demo")
    else:
        rc, out, _ = run_cli(capsys, "demo", "--help")
        assert rc == 0 and "usage: splice demo" in out


# --------------------------------------------------------------------------- inspect


def test_inspect_hf_dir(capsys, llama_hf_dir):
    rc, out, err = run_cli(capsys, "inspect", llama_hf_dir)
    assert rc == 0, err
    for text in ("model.layers.0.self_attn.q_proj", "aten.linear", "64×64", "16,384", "lm_head",
                 "params: 90,440", "weight", "aten.linear ×15", "input_ids"):
        assert text in out, text
    assert "pass history" not in out


def test_inspect_coupling(capsys, llama_hf_dir):
    rc, out, err = run_cli(capsys, "inspect", llama_hf_dir, "--coupling")
    assert rc == 0, err
    table = out[out.index("coupling groups"):]
    assert "coupling groups (11, 9 shrinkable)" in table
    rows = [line for line in table.splitlines() if "│" in line]
    kinds = [row.split("│")[2].strip() for row in rows]
    assert kinds.count("mlp") == 2 and kinds.count("kv_heads") == 2 and kinds.count("residual") == 1
    assert kinds.count("heads (2 per #1)") + kinds.count("heads (2 per #7)") == 2  # GQA: each KV head carries two query heads
    assert "no: rows read by" in table and "aten.slice.Tensor" in table


def test_inspect_artifact(capsys, artifact):
    rc, out, err = run_cli(capsys, "inspect", artifact[0])
    assert rc == 0, err
    assert "artifact of hf" in out and "splice.qlinear" in out and "qweight" in out
    history = out[out.index("pass history"):]
    assert "sqnr dB" in history and "cosine" in history
    row = next(line for line in history.splitlines() if "quantize.rtn" in line)
    cosine = float(row.split("│")[5])
    assert 0.95 < cosine < 1.0, row


# ------------------------------------------------------------------------ run/export


def test_run_summary(artifact):
    out, stdout = artifact
    assert (out / "manifest.json").is_file() and (out / "program.pt2").is_file()
    assert "quantize.rtn" in stdout and "sqnr dB" in stdout and "→" in stdout
    assert "saved artifact" in stdout and "smaller" in stdout
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs


def test_export_check(capsys, artifact, tmp_path):
    dest = tmp_path / "sub" / "m.onnx"
    rc, out, err = run_cli(capsys, "export", artifact[0], "--onnx", dest, "--check")
    assert rc == 0, err
    assert dest.is_file() and "parity" in out and "batch 3 × seq 17" in out
    diff = float(out.split("= ")[1].split()[0])
    assert diff <= 1e-4
    assert sorted(p.name for p in dest.parent.iterdir()) == ["m.onnx"]
    assert_error(capsys, ["export", artifact[0], "--onnx", dest], dest, "--force")  # exists
    rc, _, err = run_cli(capsys, "export", artifact[0], "--onnx", dest, "--force")
    assert rc == 0, err


def test_export_check_failure_writes_nothing(capsys, artifact, tmp_path):
    dest = tmp_path / "new" / "m.onnx"  # not even the parent directory is left behind
    assert_error(capsys, ["export", artifact[0], "--onnx", dest, "--check", "--atol", "0"],
                 "m.onnx", "differs", absent=[dest])
    assert list(tmp_path.iterdir()) == []


def test_run_recipe_and_force(capsys, llama_hf_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("passes:\n  - quantize.rtn: {bits: 8, targets: lm_head}\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "junk.txt").write_text("old")
    rc, stdout, err = run_cli(capsys, "run", llama_hf_dir, "--recipe", recipe,
                              "-p", "quantize.rtn:targets=model.layers.*", "-o", out, "--force")
    assert rc == 0, err
    assert not (out / "junk.txt").exists()
    history = splice.load(out).history
    assert [h["spec"] for h in history] == ["quantize.rtn:bits=8,targets=lm_head",
                                           "quantize.rtn:targets=model.layers.*"]
    assert "bits=8" in stdout


# -------------------------------------------------------------------------- bad input


def test_missing_path(capsys, tmp_path):
    missing = tmp_path / "nope"
    out = tmp_path / "out"
    assert_error(capsys, ["inspect", missing], "nope", "no such file")
    assert_error(capsys, ["run", missing, "-p", RTN, "-o", out], "nope", absent=[out])
    assert_error(capsys, ["export", missing, "--onnx", tmp_path / "m.onnx"], "nope",
                 absent=[tmp_path / "m.onnx"])


@pytest.mark.parametrize("contents", [{}, {"weights.bin": b"\x00\x01", "notes.txt": b"hello"}],
                         ids=["empty", "random-files"])
def test_not_a_model_dir(capsys, tmp_path, contents):
    model = tmp_path / "model"
    model.mkdir()
    for name, data in contents.items():
        (model / name).write_bytes(data)
    out = tmp_path / "out"
    assert_error(capsys, ["inspect", model], "model", "not a model directory")
    assert_error(capsys, ["run", model, "-p", RTN, "-o", out], "not a model directory", absent=[out])


def test_broken_config_json(capsys, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama", ')
    assert_error(capsys, ["inspect", model], "model", "config")


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.config = type("Config", (), {"vocab_size": 16, "model_type": "toy"})()

    def forward(self, input_ids):
        x = self.proj(torch.nn.functional.one_hot(input_ids, 8).float())
        if x.sum() > 0:  # data-dependent Python control flow: torch.export cannot capture it
            return x * 2
        return x


def test_capture_error_in_process():
    with pytest.raises(CaptureError, match="DataDependent.*data-dependent"):
        splice.capture(DataDependent(), (torch.randint(0, 8, (2, 4)),))


def test_capture_error_cli(capsys, monkeypatch, llama_hf_dir, tmp_path):
    from splice.frontends import hf

    monkeypatch.setattr(hf, "load_hf_model", lambda path: DataDependent().eval())
    out = tmp_path / "out"
    line = assert_error(capsys, ["run", llama_hf_dir, "-p", RTN, "-o", out], "cannot capture DataDependent",
                        absent=[out])
    assert str(llama_hf_dir) in line
    assert_error(capsys, ["inspect", llama_hf_dir], "cannot capture")


@pytest.mark.parametrize("spec, needles", [
    ("quantize.rnt", ["unknown pass 'quantize.rnt'", "did you mean 'quantize.rtn'"]),
    ("quantize.rtn:bitz=4", ["quantize.rtn", "'bitz'", "did you mean 'bits'"]),
    ("quantize.rtn:bits=9", ["quantize.rtn", "bits", "9"]),
    ("quantize.rtn:group_size=-3", ["quantize.rtn", "group_size", "-3"]),
    ("quantize.rtn:bits=four", ["quantize.rtn", "bits", "four"]),
    ("quantize.rtn:bits", ["quantize.rtn", "key=value"]),
])
def test_bad_spec_fails_before_capture(capsys, no_capture, llama_hf_dir, tmp_path, spec, needles):
    out = tmp_path / "out"
    # a good spec first: every spec is validated before anything runs
    assert_error(capsys, ["run", llama_hf_dir, "-p", RTN, "-p", spec, "-o", out], *needles, absent=[out])


def test_unknown_pass_name(capsys):
    assert_error(capsys, ["passes", "quantize.rnt"], "quantize.rnt", "did you mean 'quantize.rtn'")


def test_group_size_must_divide(capsys, llama_hf_dir, tmp_path):
    out = tmp_path / "out"
    assert_error(capsys, ["run", llama_hf_dir, "-p", "quantize.rtn:group_size=48", "-o", out],
                 "group_size 48", "in_features 64", "model.layers.0.self_attn.q_proj", absent=[out])
    assert list(tmp_path.iterdir()) == []  # no temp dirs either


def test_targets_match_nothing(capsys, llama_hf_dir, tmp_path):
    out = tmp_path / "out"
    assert_error(capsys, ["run", llama_hf_dir, "-p", "quantize.rtn:targets=nonexistent_layer", "-o", out],
                 "quantize.rtn", "nonexistent_layer", "matched no", absent=[out])


def test_existing_output_refused_before_capture(capsys, no_capture, llama_hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_error(capsys, ["run", llama_hf_dir, "-p", RTN, "-o", out], "out", "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("how", ["edited manifest", "truncated program", "truncated manifest"])
def test_broken_artifact(capsys, artifact, tmp_path, how):
    art, culprit = broken_copy(artifact, tmp_path, how)
    assert_error(capsys, ["inspect", art], culprit)
    dest = tmp_path / "m.onnx"
    assert_error(capsys, ["export", art, "--onnx", dest], culprit, absent=[dest])
    out = tmp_path / "out"
    assert_error(capsys, ["run", art, "-p", RTN, "-o", out], culprit, absent=[out])


def test_recipe_syntax_error(capsys, no_capture, llama_hf_dir, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("passes:\n  - quantize.rtn\n  - {bits: [4\n")
    out = tmp_path / "out"
    line = assert_error(capsys, ["run", llama_hf_dir, "--recipe", recipe, "-o", out], "YAML", absent=[out])
    assert f"{recipe}:" in line  # names file:line
    recipe.write_text("passes:\n  - quantize.rtn: {bitz: 4}\n")
    assert_error(capsys, ["run", llama_hf_dir, "--recipe", recipe, "-o", out], "bad.yaml", "pass #1",
                 "did you mean 'bits'", absent=[out])
    assert_error(capsys, ["run", llama_hf_dir, "--recipe", tmp_path / "none.yaml", "-o", out], "none.yaml",
                 absent=[out])


@pytest.mark.parametrize("content, needle", [(b"", "empty"), (b"  \n\n", "empty"), (b"a\x00b", "not a text")])
def test_bad_calib_file(capsys, no_capture, llama_hf_dir, tmp_path, content, needle):
    calib = tmp_path / "calib.txt"
    calib.write_bytes(content)
    out = tmp_path / "out"
    assert_error(capsys, ["run", llama_hf_dir, "-p", RTN, "--calib", calib, "-o", out], "calib.txt", needle,
                 absent=[out])
    assert_error(capsys, ["run", llama_hf_dir, "-p", RTN, "--calib", tmp_path / "gone.txt", "-o", out],
                 "gone.txt", absent=[out])


# ------------------------------------------------------------------ untranslatable op


@torch.library.custom_op("splice_test::noop", mutates_args=())
def _noop(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_noop.register_fake
def _(x):
    return torch.empty_like(x)


class UsesNoop(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.ops.splice_test.noop(self.proj(x))


def test_export_untranslatable_op(capsys, tmp_path):
    graph = splice.capture(UsesNoop(), (torch.randn(2, 8),))
    assert "splice_test.noop" in graph.op_counts()
    dest = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="splice_test::noop"):
        export_onnx(graph, dest)
    assert not dest.exists()
    art = tmp_path / "art"
    graph.save(art)
    assert_error(capsys, ["export", art, "--onnx", dest], "splice_test::noop", absent=[dest])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_inspect_shows_declared_report_fields(capsys, artifact):
    """`splice inspect` prints each pass's declared report fields (register_pass(report_fields=...))
    from the registry, with no CLI code per family."""
    rc, out, err = run_cli(capsys, "inspect", artifact[0])
    assert rc == 0, err
    history = " ".join(out[out.index("pass history"):].split())
    assert "report" in history and "layers quantized" in history
