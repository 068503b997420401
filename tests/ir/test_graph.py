"""Capture, canonical form, the Graph's sizes, verification and artifacts."""
import json

import pytest
import torch
from torch import nn

import splice
from splice.errors import ArtifactError, CaptureError, SpliceError, VerifyError
from splice.ir.verify import verify
from zoo_graphs import captured, input_grid

aten = torch.ops.aten


class MatmulModel(nn.Module):
    """Linear-like ops that are not nn.Linear: addmm with a [K, N] weight, x @ W, x @ W.T."""

    def __init__(self):
        super().__init__()
        self.w_kn = nn.Parameter(torch.randn(32, 16))
        self.b = nn.Parameter(torch.randn(16))
        self.w2 = nn.Parameter(torch.randn(16, 16))
        self.w3 = nn.Parameter(torch.randn(8, 16))

    def forward(self, x):
        h = torch.addmm(self.b, x.view(-1, 32), self.w_kn).view(*x.shape[:-1], 16)
        return (h @ self.w2) @ self.w3.T


def test_canonical_linear_forms():
    m = MatmulModel()
    x = torch.randn(2, 5, 32)
    g = splice.capture(m, (x,))
    counts = g.op_counts()
    assert counts.get("aten.linear") == 3
    assert not any(k in counts for k in ("aten.addmm", "aten.matmul", "aten.mm"))
    x2 = torch.randn(3, 7, 32)
    torch.testing.assert_close(g.run(x2)["output"], m(x2), atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_becomes_linear():
    zm, g = captured("gpt2")
    assert g.op_counts()["aten.linear"] == 2 * 4 + 1  # c_attn, c_proj, c_fc, mlp.c_proj per layer + lm_head
    assert "aten.addmm" not in g.op_counts()


def test_capture_matches_eager_and_keeps_dynamic_dims():
    zm, g = captured("llama")
    assert g.input_names == ["input_ids", "attention_mask"] and g.output_names == ["logits"]
    assert g.dynamic["input_ids"] == {0: "batch", 1: "seq"}
    for inputs in input_grid(zm, g):
        ref = zm.model(**dict(zip(g.input_names, inputs))).logits
        torch.testing.assert_close(g.run(*inputs)["logits"], ref, atol=1e-5, rtol=1e-5)


def test_tied_embedding_is_one_tensor_and_quantized_once():
    zm, g = captured("llama")  # tie_word_embeddings=True
    fp_bytes = g.nbytes()
    q = g.apply("quantize.rtn:bits=4,targets=linear|embedding")
    qweights = [t for t, role in q.param_roles().items() if role == "qweight"]
    assert len(qweights) == 14 + 1  # 7 linears x 2 layers + one shared table for embedding and lm_head
    assert q.bytes_by_role()["qweight"] * 8 == sum(
        q.tensor(t).numel() for t in qweights) * 8  # uint8 storage: 1 byte per element
    assert q.nbytes() < 0.2 * fp_bytes


def test_bytes_are_honest_for_packed_int4():
    zm, g = captured("bert")
    q = g.apply("quantize.rtn:bits=4,group_size=32,targets=linear")
    w = sum(r["shape"][0] * r["shape"][1] for r in g.layers() if r["kind"] == "linear")
    assert q.bytes_by_role()["qweight"] == w // 2


def test_capture_error_is_one_line():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x * 2
            return x

    with pytest.raises(CaptureError) as e:
        splice.capture(DataDependent(), (torch.randn(2, 3),))
    msg = str(e.value)
    assert "\n" not in msg and "DataDependent" in msg and "try" in msg


def test_verify_catches_broken_graph():
    zm, g = captured("cnn")
    bad = g.copy()
    lin = next(bad.nodes("linear"))
    w = lin.args[1]
    from splice.ir.graph import set_attr

    set_attr(bad.gm, w.target, torch.randn(3, 5))  # wrong shape for the layer
    with pytest.raises(VerifyError, match="shape propagation"):
        verify(bad)
    nan = g.copy()
    set_attr(nan.gm, w.target, torch.full_like(g.tensor(w.target), float("nan")))
    with pytest.raises(VerifyError, match="NaN"):
        verify(nan)
    verify(g)


def test_passes_never_mutate_their_input():
    zm, g = captured("qwen2")
    before = {k: v.clone() for k, v in g.tensors().items()}
    nodes = len(g.gm.graph.nodes)
    g.apply("quantize.rtn:bits=3")
    assert len(g.gm.graph.nodes) == nodes and g.history == []
    assert all(torch.equal(before[k], v) for k, v in g.tensors().items())


def test_artifact_round_trip_and_manifest(tmp_path):
    zm, g = captured("qwen2")
    q = g.apply("quantize.rtn:bits=4,group_size=32")
    q.save(tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["passes"][0]["spec"] == "quantize.rtn"
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest["packages"])
    assert manifest["files"]["program.pt2"]["sha256"]
    back = splice.load(tmp_path / "a")
    assert back.op_counts() == q.op_counts()
    assert next(n for n in back.gm.graph.nodes if "qlinear" in str(n.target)).meta["splice_pass"] == "quantize.rtn"
    for inputs in input_grid(zm, g):
        assert torch.equal(back.run(*inputs)["logits"], q.run(*inputs)["logits"])
    with pytest.raises(SpliceError, match="already exists"):
        q.save(tmp_path / "a")
    q.save(tmp_path / "a", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp dirs left behind


def test_tampered_artifacts_are_refused(tmp_path):
    zm, g = captured("cnn")
    g.save(tmp_path / "a")
    program = tmp_path / "a" / "program.pt2"
    data = program.read_bytes()
    program.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="program.pt2"):
        splice.load(tmp_path / "a")
    program.write_bytes(data)
    mpath = tmp_path / "a" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["source"]["name"] = "edited"
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="edited"):
        splice.load(tmp_path / "a")


def test_load_bare_pt2(tmp_path):
    zm, g = captured("cnn")
    torch.export.save(g.export_program(), tmp_path / "m.pt2")
    back = splice.load(tmp_path / "m.pt2")
    x = zm.make_inputs(3, 0)["pixel_values"]
    (a,), (b,) = back.run(x).values(), g.run(x).values()
    assert torch.equal(a, b)
