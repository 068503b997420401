"""loss="masked_lm": BERT's masking (ir/loss.py ``mask_tokens``), a bare encoder trained through its tied
word embeddings (``TiedMaskedLM``), fixed evaluation masks, and the trained graph's calibration loss (what
Fisher merging reads) being its masked-token objective."""
import pytest
import torch
from zoo_graphs import fast_train

import splice
from splice.eval import zoo
from splice.eval.data import ByteTokenizer, builtin_text
from splice.ir.loss import calibration_loss, has_label_free_loss, mask_tokens
from splice.train.data import load_examples
from splice.train.losses import TiedMaskedLM

TEXT = builtin_text("gpl3")
TRAIN, HELD_OUT = TEXT[:12000], TEXT[12000:16000]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class MaskingBytes(ByteTokenizer):
    """Bytes with NUL (never in the text) as the mask token."""

    mask_token_id = 0
    all_special_ids = [0]

    def __len__(self):
        return 256


SPEC = {"mask_token_id": 0, "vocab_size": 256, "special_ids": [0, 1]}


def test_mask_tokens_follows_bert():
    ids = torch.randint(2, 256, (64, 256))
    ids[:, 0] = 1  # a special token: never masked
    pad = torch.ones_like(ids)
    pad[:, -16:] = 0  # padding: never masked
    masked, labels = mask_tokens(ids, pad, SPEC, torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, -16:].any()
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    share = chosen.float().sum() / (pad.sum() - 64)
    assert 0.14 < share < 0.16, share
    as_mask = (masked[chosen] == 0).float().mean()
    kept = (masked[chosen] == ids[chosen]).float().mean()
    assert 0.77 < as_mask < 0.83 and 0.07 < kept < 0.13, (as_mask, kept)
    again = mask_tokens(ids, pad, SPEC, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels)
    one = mask_tokens(torch.full((1, 3), 5), None, SPEC, torch.Generator().manual_seed(1))[1]
    assert (one != -100).sum() >= 1  # at least one a row


def test_evaluation_masks_are_fixed():
    ex = load_examples([HELD_OUT], "masked_lm", MaskingBytes(), 64)
    a, b = ex.in_order(4), ex.in_order(4)
    assert all(torch.equal(x["labels"], y["labels"]) and torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert all((x["labels"] != -100).any(1).all() for x in a)


def test_masked_lm_trains_a_bare_encoder_through_its_tied_embeddings():
    built = zoo.build("bert", seed=0)
    ids = built.example_inputs["input_ids"]
    graph = splice.capture(TiedMaskedLM(built.model), (ids, torch.ones_like(ids)))
    assert graph.output_names == ["logits"] and has_label_free_loss(graph)
    lora = graph.apply("adapter.lora:rank=8")
    added = [t for t in lora.tensors() if t not in graph.tensors()]
    assert added and not any("embeddings" in t or t.startswith(("lm_head", "linear")) for t in added), added
    fast = {**fast_train(), "tokenizer": MaskingBytes()}
    trained, report = splice.train(lora, [TRAIN], loss="masked_lm", eval_data=[HELD_OUT], steps=30, lr=2e-2, **fast)
    assert report["eval_loss_after"] < report["eval_loss_before"] - 0.15, report
    assert trained.source["masked_lm"]["mask_token_id"] == 0
    # its calibration loss is the masked-token objective, the same for every call on the same sample
    sample = (ids, torch.ones_like(ids))
    with torch.no_grad():
        first = calibration_loss(trained, sample, trained.gm(*sample), "test")
        again = calibration_loss(trained, sample, trained.gm(*sample), "test")
    assert torch.isfinite(first) and float(first) == float(again)
    other, _ = splice.train(lora, [HELD_OUT], loss="masked_lm", steps=5, lr=2e-2, **fast)
    calib = [(w, torch.ones_like(w)) for w in torch.randint(1, 256, (4, 2, 64))]  # 512 tokens
    merged = splice.merge([trained.apply("adapter.fold:keep=false"), other.apply("adapter.fold:keep=false")],
                          "fisher", calibration=calib)
    assert torch.isfinite(merged.run(*sample)["logits"]).all()
