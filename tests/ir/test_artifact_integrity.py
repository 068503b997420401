"""Artifact integrity: crafted artifacts never run code, manifests stay inside the artifact, and
every write (disk full, read-only, symlinked output, SIGKILL, concurrent saves, Ctrl-C) ends with
either the whole result or nothing, and a one-line error naming the path."""
import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import splice
from splice.errors import ArtifactError, OutputError
from splice.ir.artifact import INPUTS, MANIFEST, PROGRAM, manifest_checksum, sha256
from splice.ir.atomic import atomic_dir
from zoo_graphs import assert_error, captured

RTN = "quantize.rtn:bits=4,group_size=32"
REPO = Path(__file__).resolve().parents[2]


class _Touch:
    """Unpickling this creates ``path``: the payload of every crafted member."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ----------------------------------------------------------------------------- crafting


def rewrite_zip(pt2: Path, changes: dict, deflate=()) -> None:
    """Rewrite the ``.pt2`` zip with members (names below the root folder) replaced or added."""
    with zipfile.ZipFile(pt2) as z:
        root = z.namelist()[0].split("/", 1)[0]
        members = {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}
    members.update(changes)
    with zipfile.ZipFile(pt2, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(f"{root}/{name}", data, zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED)


def read_member(pt2: Path, member: str) -> bytes:
    with zipfile.ZipFile(pt2) as z:
        return z.read(f"{z.namelist()[0].split('/', 1)[0]}/{member}")


def craft(pt2: Path, how: str, marker: Path) -> None:
    """Plant a payload that creates ``marker`` into ``pt2`` the way ``how`` names."""
    payload = pickle.dumps(_Touch(marker))
    weights = "data/weights/model_weights_config.json"
    if how == "sample inputs":
        rewrite_zip(pt2, {"data/sample_inputs/model.pt": payload})
    elif how.startswith("use_pickle"):
        config = json.loads(read_member(pt2, weights))
        fqn, meta = next(iter(config["config"].items()))
        meta["use_pickle"] = True
        text = json.dumps(config, separators=(",", ":") if how.endswith("no space") else None)
        assert ('"use_pickle":true' if how.endswith("no space") else '"use_pickle": true') in text
        rewrite_zip(pt2, {weights: text.encode(), f"data/weights/{meta['path_name']}": payload})
    elif how == "legacy model.pt":
        rewrite_zip(pt2, {"data/weights/model.pt": payload})
    elif how.endswith("constant") or how.endswith("use_pickle false"):
        name = "custom_obj_0" if how.startswith("custom") else "opaque_obj_0"
        meta = {"path_name": name, "is_param": False, "use_pickle": True, "tensor_meta": None}  # as torch writes them
        if how.endswith("use_pickle false"):  # torch reads the bytes as a uint8 tensor, then unpickles them anyway
            strided = {"sizes": [{"as_int": len(payload)}], "strides": [{"as_int": 1}], "storage_offset": {"as_int": 0}}
            tensor_meta = {"dtype": 1, "requires_grad": False, "device": {"type": "cpu", "index": None}, "layout": 7}
            meta.update(use_pickle=False, tensor_meta=tensor_meta | strided)
        config = json.dumps({"config": {"evil": meta}}).encode()
        rewrite_zip(pt2, {"data/constants/model_constants_config.json": config, f"data/constants/{name}": payload})
    else:
        raise AssertionError(how)


def reseal(art: Path, edit=lambda m: None) -> None:
    """Recompute every hash and the checksum after ``edit(manifest)``, as an attacker can (unkeyed)."""
    m = json.loads((art / MANIFEST).read_text())
    edit(m)
    for name, info in m.get("files", {}).items():
        if isinstance(name, str) and (art / name).is_file():
            info.update(sha256=sha256(art / name), bytes=(art / name).stat().st_size)
    m["checksum"] = manifest_checksum(m)
    (art / MANIFEST).write_text(json.dumps(m))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A cnn graph saved as an artifact, and the graph."""
    _, g = captured("cnn")
    art = tmp_path_factory.mktemp("saved") / "art"
    g.save(art)
    return art, g


@pytest.fixture
def art_copy(saved, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(saved[0], art)
    return art


PAYLOADS = ["sample inputs", "use_pickle", "use_pickle no space", "legacy model.pt", "opaque constant",
            "opaque constant with use_pickle false", "custom object constant"]


# --------------------------------------------------------------------------- no pickle


def test_saved_artifact_holds_no_pickle(saved):
    art, g = saved
    assert sorted(os.listdir(art)) == sorted([MANIFEST, PROGRAM, INPUTS])
    assert read_member(art / PROGRAM, "data/sample_inputs/model.pt") == b""
    assert set(json.loads((art / MANIFEST).read_text())["files"]) == {PROGRAM, INPUTS}
    back = splice.load(art)
    x = back.example_inputs[0]
    assert torch.equal(x, g.example_inputs[0])
    assert torch.equal(next(iter(back.run(x).values())), next(iter(g.run(x).values())))


@pytest.mark.parametrize("how", [h for h in PAYLOADS if h != "custom object constant"])
def test_crafted_payloads_are_live(art_copy, tmp_path, how):
    """Control: torch.export.load itself runs each planted payload, so the refusals below mean something."""
    marker = tmp_path / "ran"
    craft(art_copy / PROGRAM, how, marker)
    with contextlib.suppress(Exception):
        torch.export.load(art_copy / PROGRAM)
    assert marker.exists()


@pytest.mark.parametrize("how", PAYLOADS)
def test_pickle_members_are_refused_by_load(art_copy, tmp_path, how):
    marker = tmp_path / "ran"
    craft(art_copy / PROGRAM, how, marker)
    reseal(art_copy)
    with pytest.raises(ArtifactError, match="refusing") as e:
        splice.load(art_copy)
    assert "\n" not in str(e.value) and "program.pt2" in str(e.value) and "member" in str(e.value)
    bare = tmp_path / "bare.pt2"
    shutil.copy(art_copy / PROGRAM, bare)
    with pytest.raises(ArtifactError, match="refusing"):
        splice.load(bare)
    assert not marker.exists()


def test_duplicated_use_pickle_key_is_refused(art_copy):
    """``{"use_pickle": false, "use_pickle": true}``: a reader taking the first key would see false."""
    weights = "data/weights/model_weights_config.json"
    text = read_member(art_copy / PROGRAM, weights).decode()
    rewrite_zip(art_copy / PROGRAM, {weights: text.replace('"use_pickle": false', '"use_pickle": false, "use_pickle": true', 1).encode()})
    reseal(art_copy)
    with pytest.raises(ArtifactError, match="duplicated JSON key"):
        splice.load(art_copy)


def test_compressed_tensor_member_is_refused(art_copy):
    rewrite_zip(art_copy / PROGRAM, {}, deflate={"data/weights/weight_0"})
    reseal(art_copy)
    with pytest.raises(ArtifactError, match="weight_0: not stored raw"):
        splice.load(art_copy)


def test_bare_pt2_written_by_torch_loads(saved, tmp_path):
    """torch.export.save's own sample inputs are read with weights_only."""
    _, g = saved
    torch.export.save(g.export_program(), tmp_path / "m.pt2")
    back = splice.load(tmp_path / "m.pt2")
    assert torch.equal(back.example_inputs[0], g.example_inputs[0])


def test_non_operator_target_and_eval_expression_are_refused(art_copy, tmp_path):
    marker = tmp_path / "ran"
    program = json.loads(read_member(art_copy / PROGRAM, "models/model.json"))
    node = program["graph_module"]["graph"]["nodes"][0]
    target = node["target"]
    node["target"] = "torch.serialization.os.system"
    rewrite_zip(art_copy / PROGRAM, {"models/model.json": json.dumps(program).encode()})
    reseal(art_copy)
    with pytest.raises(ArtifactError, match="torch.serialization.os.system.*not a registered operator"):
        splice.load(art_copy)
    program["graph_module"]["graph"]["nodes"][0] = node | {"target": target}
    sym = {"as_expr": {"expr_str": f"__import__('builtins').open('{marker}', 'w')", "hint": None}}
    program["graph_module"]["graph"]["sym_int_values"] = {"evil": sym}
    rewrite_zip(art_copy / PROGRAM, {"models/model.json": json.dumps(program).encode()})
    reseal(art_copy)
    with pytest.raises(ArtifactError, match="not arithmetic"):
        splice.load(art_copy)
    assert not marker.exists()


def _cli():
    if (REPO / "splice" / "__main__.py").exists():
        return [sys.executable, "-m", "splice"]
    return [shutil.which("splice") or pytest.skip("no splice console script")]


@pytest.mark.parametrize("how", ["sample inputs"] + [pytest.param(h, marks=pytest.mark.slow) for h in (
    "use_pickle no space", "legacy model.pt", "opaque constant")])  # every payload is refused by load above
def test_pickle_members_are_refused_by_the_cli(art_copy, tmp_path, how):
    marker = tmp_path / "ran"
    craft(art_copy / PROGRAM, how, marker)
    reseal(art_copy)
    onnx_out, run_out = tmp_path / "m.onnx", tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    for argv in (["inspect", art_copy], ["export", art_copy, "--onnx", onnx_out], ["run", art_copy, "-p", RTN, "-o", run_out]):
        r = subprocess.run(_cli() + [str(a) for a in argv], capture_output=True, text=True, env=env, timeout=600)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("splice: error: "), (argv, r.stderr)
        assert "refusing" in lines[0] and "program.pt2" in lines[0] and "Traceback" not in r.stderr
    assert not marker.exists() and not onnx_out.exists() and not run_out.exists()


# ------------------------------------------------------------------------------ manifest


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", "sub/../program.pt2", "./program.pt2"])
def test_listed_paths_outside_the_artifact_are_refused(art_copy, tmp_path, name):
    (tmp_path / "outside.bin").write_bytes(b"secret")
    reseal(art_copy, lambda m: m["files"].__setitem__(name, {"sha256": "0" * 64, "bytes": 6}))
    with pytest.raises(ArtifactError, match="not a plain file name") as e:
        splice.load(art_copy)
    assert name in str(e.value)


def test_symlinked_member_is_refused(art_copy, tmp_path):
    outside = tmp_path / "inputs.safetensors"
    shutil.move(art_copy / INPUTS, outside)
    (art_copy / INPUTS).symlink_to(outside)
    reseal(art_copy)
    with pytest.raises(ArtifactError, match="symbolic link"):
        splice.load(art_copy)


@pytest.mark.parametrize("name", [PROGRAM, INPUTS])
def test_manifest_must_list_program_and_inputs(art_copy, name):
    reseal(art_copy, lambda m: m["files"].pop(name))
    with pytest.raises(ArtifactError, match=f"does not list {name}"):
        splice.load(art_copy)


def test_unlisted_file_is_refused(art_copy):
    (art_copy / "extra.txt").write_text("hi")
    with pytest.raises(ArtifactError, match="extra.txt: not listed"):
        splice.load(art_copy)


@pytest.mark.parametrize("key", ["dynamic", "inputs", "outputs", "source", "passes", "files", "format_version"])
def test_manifest_missing_a_required_key(art_copy, key):
    reseal(art_copy, lambda m: m.pop(key))
    with pytest.raises(ArtifactError, match=f"manifest has no '{key}'"):
        splice.load(art_copy)


def test_manifest_key_of_wrong_type(art_copy):
    reseal(art_copy, lambda m: m.__setitem__("dynamic", []))
    with pytest.raises(ArtifactError, match="'dynamic' must be a dict"):
        splice.load(art_copy)


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.__setitem__("inputs", ["x"]), "the manifest's inputs are ['x']"),
    (lambda m: m.__setitem__("outputs", m["outputs"] * 2), "do not match program.pt2"),
    (lambda m: m.__setitem__("passes", ["quantize.rtn"]), "'passes' must list pass entries"),
])
def test_manifest_spec_must_match(art_copy, edit, needle):
    reseal(art_copy, edit)
    with pytest.raises(ArtifactError, match=re.escape(needle)):
        splice.load(art_copy)


# -------------------------------------------------------------------------------- writes


class _Wide(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(512, 1024)  # 2 MiB of weights: more than the 1 MiB disk

    def forward(self, x):
        return self.fc(x)


@contextlib.contextmanager
def tmpfs(path: Path, *options):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=1m",) + options), "tmpfs", str(path)],
                       capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full(tmp_path):
    from splice.runtime.onnx import export_onnx

    g = splice.capture(_Wide(), (torch.randn(2, 512),))
    with tmpfs(tmp_path / "full") as disk:
        with pytest.raises(OutputError, match="No space left on device") as e:
            g.save(disk / "art")
        assert str(disk / "art") in str(e.value) and "\n" not in str(e.value)
        assert os.listdir(disk) == []
        with pytest.raises(OutputError, match="No space left on device"):
            export_onnx(g, disk / "sub" / "m.onnx", external_data=True)
        assert os.listdir(disk) == []
        wide = g.apply("adapter.lora:rank=256,init=random")  # 1.5 MiB of adapter tensors
        with pytest.raises(OutputError, match="No space left on device") as e:
            splice.save_peft(wide, disk / "peft")
        assert "\n" not in str(e.value) and os.listdir(disk) == []


def test_read_only_directory(saved, tmp_path):
    _, g = saved
    if os.geteuid() == 0:
        ctx = tmpfs(tmp_path / "ro", "ro")
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        ctx = contextlib.nullcontext(tmp_path / "ro")
    with ctx as ro:
        with pytest.raises(OutputError, match="read-only or permission denied") as e:
            g.save(ro / "art")
        assert str(ro / "art") in str(e.value)
        assert os.listdir(ro) == []


def test_symlinked_output_is_refused(saved, tmp_path):
    _, g = saved
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("mine")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    with pytest.raises(OutputError, match="symbolic link") as e:
        g.save(tmp_path / "link", force=True)
    assert str(tmp_path / "link") in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["link", "real"] and os.listdir(real) == ["keep.txt"]


def test_onnx_export_into_an_artifact_is_refused(saved, tmp_path):
    from splice.runtime.onnx import export_onnx

    art, g = saved
    before = sha256(art / PROGRAM)
    with pytest.raises(OutputError, match="inside the splice artifact"):
        export_onnx(g, art / PROGRAM, force=True)
    assert sha256(art / PROGRAM) == before and sorted(os.listdir(art)) == sorted([MANIFEST, PROGRAM, INPUTS])


def test_onnx_export_onto_a_directory_is_refused(saved, tmp_path):
    from splice.runtime.onnx import export_onnx

    _, g = saved
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="is a directory"):
        export_onnx(g, tmp_path / "d", force=True)
    assert os.listdir(tmp_path / "d") == ["keep.txt"]


def test_cli_refuses_outputs_before_any_work(capsys, no_capture, saved, llama_hf_dir, tmp_path):
    art, _ = saved
    before = sha256(art / PROGRAM)
    assert_error(capsys, ["export", art, "--onnx", art / PROGRAM, "--force"], str(art / PROGRAM),
                 "inside the splice artifact")
    assert sha256(art / PROGRAM) == before
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    assert_error(capsys, ["run", llama_hf_dir, "-p", RTN, "-o", tmp_path / "link", "--force"],
                 str(tmp_path / "link"), "symbolic link")
    assert sorted(os.listdir(tmp_path)) == ["link", "real"] and os.listdir(tmp_path / "real") == []


_KILLED_SAVE = """
import os, signal, sys
from splice.ir.atomic import atomic_dir

def write(tmp):
    (tmp / "big.bin").write_bytes(b"x" * (4 << 20))
    os.kill(os.getpid(), signal.SIGKILL)

atomic_dir(sys.argv[1], True, write)
"""


def test_sigkilled_save_is_cleaned_by_the_next_save(saved, tmp_path):
    _, g = saved
    r = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(tmp_path / "art")], env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == -signal.SIGKILL
    assert any(".art.tmp-" in n for n in os.listdir(tmp_path))  # what SIGKILL leaves
    g.save(tmp_path / "art", force=True)
    assert os.listdir(tmp_path) == ["art"]
    splice.load(tmp_path / "art")


_CONCURRENT_SAVE = """
import shutil, sys, time
from pathlib import Path
from splice.ir.atomic import atomic_dir

src, go = Path(sys.argv[1]), Path(sys.argv[3])

def write(tmp):  # the files of a saved artifact, slowly, so the saves overlap
    for f in sorted(src.iterdir()):
        shutil.copy(f, tmp / f.name)
        time.sleep(0.05)

while not go.exists():
    time.sleep(0.01)
atomic_dir(sys.argv[2], True, write)
"""


def test_concurrent_saves_to_one_path(saved, tmp_path):
    art, _ = saved
    out, go = tmp_path / "out" / "art", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_SAVE, str(art), str(out), str(go)], env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(6)]
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert os.listdir(out.parent) == ["art"]  # no temporaries, no .old dirs, no lock file
    assert sorted(os.listdir(out)) == sorted([MANIFEST, PROGRAM, INPUTS])
    splice.load(out)


def test_ctrl_c_during_a_save_leaves_nothing(tmp_path):
    def write(tmp):
        (tmp / "part.bin").write_bytes(b"x" * 1000)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_dir(tmp_path / "new" / "art", False, write)
    assert os.listdir(tmp_path) == []


def test_existing_output_needs_force(saved, tmp_path):
    _, g = saved
    (tmp_path / "art").mkdir()
    with pytest.raises(OutputError, match="already exists; use --force"):
        g.save(tmp_path / "art")
    g.save(tmp_path / "art", force=True)
    assert sorted(os.listdir(tmp_path / "art")) == sorted([MANIFEST, PROGRAM, INPUTS])


def test_checkpoint_write_failure_is_one_line(tmp_path):
    from splice.train.checkpoint import save_checkpoint

    with tmpfs(tmp_path / "full") as disk:
        with pytest.raises(OutputError, match="No space left on device"):
            save_checkpoint(disk, {"w": torch.zeros(1 << 19)}, {"step": 1, "m": torch.zeros(1 << 19)}, {"run": 1})
        assert os.listdir(disk) == []


def test_payload_helper_is_real(tmp_path):
    """The marker payload itself: plain unpickling creates the file."""
    pickle.loads(pickle.dumps(_Touch(tmp_path / "x")))
    assert (tmp_path / "x").exists()


# ------------------------------------------------------------------------- pruning masks


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["masks"].update({"fc": [10, 64, 3]}), "no 1920-weight bitmask for 'fc'"),
    (lambda m: m["masks"].update({"fc": "10x64"}), "mask shape of 'fc' must list sizes"),
    (lambda m: m["files"].pop("masks.safetensors"), "masks.safetensors: not listed in the manifest"),
])
def test_crafted_masks_are_refused(tmp_path, edit, message):
    """Masks of quantized layers live in masks.safetensors: a shape that does not fit the bitmask,
    a malformed shape or an unlisted file is one line, nothing read past it."""
    _, g = captured("cnn")
    art = tmp_path / "art"
    g.apply("prune.magnitude:targets=conv|fc,include_head=true", "quantize.rtn:bits=8,group_size=0").save(art)
    assert (art / "masks.safetensors").is_file()
    reseal(art, edit)
    with pytest.raises(ArtifactError, match=message) as err:
        splice.load(art)
    assert "\n" not in str(err.value)
