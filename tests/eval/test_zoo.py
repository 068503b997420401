"""The tiny model zoo exports with dynamic dims and matches eager; metrics and data helpers."""

import math
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch.utils._pytree import tree_leaves

from splice.errors import SpliceError
from splice.eval import data, zoo
from splice.ir import metrics


@pytest.fixture(scope="module", params=zoo.ZOO_NAMES)
def exported(request):
    zm = zoo.build(request.param)
    ep = torch.export.export(zm.model, (), zm.example_inputs,
                             dynamic_shapes=zoo.dynamic_shapes(zm), strict=False)
    return zm, ep


def test_zoo_registry():
    assert set(zoo.ZOO) == set(zoo.ZOO_NAMES) == {"llama", "qwen2", "gpt2", "bert", "vit", "cnn"}
    with pytest.raises(KeyError, match="unknown zoo model"):
        zoo.build("nope")


def test_build_is_seeded_and_leaves_global_rng():
    state = torch.random.get_rng_state()
    a, b, c = zoo.build("llama", seed=0), zoo.build("llama", seed=0), zoo.build("llama", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc = (m.model.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_model_properties(exported):
    zm, _ = exported
    assert not zm.model.training
    assert all(p.dtype == torch.float32 for p in zm.model.parameters())
    assert zm.kind in ("decoder", "encoder", "vision", "cnn")
    assert set(zm.dynamic) == set(zm.example_inputs)
    for mod in zm.model.modules():  # group-32 quantization fits every linear
        if isinstance(mod, torch.nn.Linear):
            assert mod.in_features % 32 == 0, mod
        elif type(mod).__name__ == "Conv1D":  # GPT-2
            assert mod.weight.shape[0] % 32 == 0, mod


def test_model_specifics():
    llama = zoo.build("llama").model
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    attn = llama.model.layers[0].self_attn
    assert attn.k_proj.out_features == attn.q_proj.out_features // 2  # GQA
    qwen = zoo.build("qwen2").model
    assert qwen.model.layers[0].self_attn.q_proj.bias is not None
    assert qwen.lm_head.weight is not qwen.model.embed_tokens.weight
    cnn = zoo.build("cnn").model
    convs = [m for m in cnn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert any(c.groups == c.in_channels > 1 for c in convs)
    assert any(c.kernel_size == (1, 1) for c in convs)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("seq", [5, 40])
def test_export_matches_eager(exported, batch, seq):
    zm, ep = exported
    inputs = zm.make_inputs(batch, seq, seed=1)
    with torch.no_grad():
        ref, got = zm.model(**inputs), ep.module()(**inputs)
    ref_leaves, got_leaves = tree_leaves(ref), tree_leaves(got)
    assert len(ref_leaves) == len(got_leaves) > 0
    assert ref_leaves[0].shape[0] == batch
    if zm.max_seq:
        assert ref_leaves[0].shape[1] == seq
    for r, g in zip(ref_leaves, got_leaves):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_example_inputs_are_batch2(exported):
    zm, _ = exported
    for v in zm.example_inputs.values():
        assert v.shape[0] == 2  # batch 1 would specialise the batch dim during export


# ---- metrics ---------------------------------------------------------------------------


def test_metrics_identical():
    x = torch.randn(4, 7, 32)
    m = metrics.compare(x, x.clone(), logits=True)
    assert m["max_abs"] == 0.0 and m["sqnr_db"] == math.inf
    assert m["cosine"] == pytest.approx(1.0) and m["cosine_flat"] == pytest.approx(1.0)
    assert m["kl"] == pytest.approx(0.0, abs=1e-12) and m["top1"] == 1.0
    assert all(type(v) is float for v in m.values())


def test_metrics_known_noise():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(64, 1024, generator=g)
    test = ref + 0.1 * torch.randn(64, 1024, generator=g)  # SNR 100x -> 20 dB
    assert metrics.sqnr_db(ref, test) == pytest.approx(20.0, abs=0.2)
    assert metrics.cosine(ref, test) == pytest.approx(1 / math.sqrt(1.01), abs=1e-3)
    assert metrics.max_abs(ref, test) == pytest.approx(float((ref - test).abs().max()))
    assert metrics.cosine(ref, -ref) == pytest.approx(-1.0)
    assert metrics.kl_logits(ref, test) > 0


def test_metrics_kl_known_value():
    ref = torch.log(torch.tensor([[0.5, 0.5]]))
    test = torch.log(torch.tensor([[0.25, 0.75]]))
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert metrics.kl_logits(ref, test) == pytest.approx(want)


def test_metrics_zero_rows_and_shape_mismatch():
    z = torch.zeros(3, 8)
    assert metrics.cosine(z, z) == 1.0 and metrics.sqnr_db(z, z) == math.inf
    assert metrics.sqnr_db(z, z + 1) == -math.inf
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.compare(torch.zeros(2, 3), torch.zeros(3, 2))


def test_compare_outputs():
    ref = {"logits": torch.randn(2, 5, 16), "hidden": torch.randn(2, 5, 8)}
    test = {k: v + 1e-3 for k, v in ref.items()}
    out = metrics.compare_outputs(ref, test)
    assert set(out) == {"logits", "hidden"} and "kl" in out["logits"] and "kl" not in out["hidden"]
    tup = metrics.compare_outputs((ref["logits"],), (test["logits"],), logits_names=("0",))
    assert tup["0"]["top1"] == 1.0
    assert set(metrics.compare_outputs(ref["hidden"], ref["hidden"])) == {"output"}
    with pytest.raises(ValueError, match="output names differ"):
        metrics.compare_outputs(ref, {"logits": test["logits"]})


def test_compare_outputs_on_zoo_model(exported):
    zm, ep = exported
    inputs = zm.make_inputs(2, 8)
    with torch.no_grad():
        out = metrics.compare_outputs(zm.model(**inputs), ep.module()(**inputs),
                                      logits_names=("logits", "output"))
    assert out
    for name, m in out.items():
        assert m["sqnr_db"] > 100 and m["cosine"] == pytest.approx(1.0), name
        assert m.get("top1", 1.0) == 1.0


# ---- data ------------------------------------------------------------------------------


@pytest.mark.parametrize("content, why", [
    (None, "no such file"),
    (b"", "empty"),
    (b" \n\t\n", "empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a text file"),
    (b"caf\xe9 au lait\xff", "not a UTF-8 text file"),
])
def test_read_text_errors(tmp_path, content, why):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SpliceError, match=why) as e:
        data.read_text(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg


def test_read_text_directory(tmp_path):
    with pytest.raises(SpliceError, match="is a directory"):
        data.read_text(tmp_path)


def test_read_text_ok(tmp_path):
    path = tmp_path / "ok.txt"
    path.write_text("héllo\nworld\n", encoding="utf-8")
    assert data.read_text(str(path)) == "héllo\nworld\n"


def test_builtin_texts():
    pydoc = data.builtin_text("pydoc")
    assert len(pydoc) > 100_000 and "assert" in pydoc
    if os.path.exists(data.GPL3_PATH):
        assert "GNU GENERAL PUBLIC LICENSE" in data.builtin_text("gpl3")
    with pytest.raises(SpliceError, match="unknown built-in text"):
        data.builtin_text("wiki")


def test_token_batches():
    tok = data.ByteTokenizer()
    rng = random.Random(0)
    text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(1000))
    batches = data.token_batches(tok, text, n_samples=5, seq_len=64, seed=3, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 64), (2, 64), (1, 64)]
    windows = torch.cat([b["input_ids"] for b in batches])
    starts = [text.index(tok.decode(w)) for w in windows]
    assert all(s % 64 == 0 for s in starts) and starts == sorted(set(starts))
    assert all(torch.equal(b["attention_mask"], torch.ones_like(b["input_ids"])) for b in batches)
    again = data.token_batches(tok, text, n_samples=5, seq_len=64, seed=3, batch_size=2)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    with pytest.raises(SpliceError, match="calibration text has 1000 tokens, need 1280"):
        data.token_batches(tok, text, n_samples=10, seq_len=128)


def test_split_text():
    text = "".join(f"line {i}\n" for i in range(100))
    train, held = data.split_text(text, 0.1)
    assert train + held == text and train.endswith("\n")
    assert 0.07 < len(held) / len(text) < 0.13
    for bad in (0, 1, -0.5):
        with pytest.raises(SpliceError, match="held_out_fraction"):
            data.split_text(text, bad)
    with pytest.raises(SpliceError, match="too short"):
        data.split_text("x", 0.5)
