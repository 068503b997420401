"""Recovery training of a pruned model: PERP (only norms and biases, or masked weights) keeps every
pruned weight zero and lowers the loss; PASER picks the examples pruning degraded most."""
import pytest
import torch
from zoo_graphs import fast_train, captured, run_cli

import splice
from splice.errors import ConfigError
from splice.eval.data import ByteTokenizer, builtin_text
from splice.ir.sparsity import check_masks, weight_layers
from splice.ir.weights import dense_weight
from splice.train.data import text_windows
from splice.train.select import Paser, allocate, token_clusters

TEXT = builtin_text("gpl3")
FAST = fast_train()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def qwen2():
    return captured("qwen2")[1]


@pytest.fixture(scope="module")
def pruned(qwen2):
    return qwen2.apply("prune.magnitude:sparsity=0.6")


def _changed(before, after) -> set[str]:
    a, b = before.tensors(), after.tensors()
    return {t for t in b if t in a and not torch.equal(a[t], b[t])}


def test_perp_trains_only_norms_and_biases(pruned):
    out, report = splice.train(pruned, [TEXT[:12000]], eval_data=[TEXT[12000:16000]], steps=20, lr=1e-2,
                               trainable="norms,biases", **FAST)
    roles = pruned.param_roles()
    changed = _changed(pruned, out)
    assert changed and {roles[t] for t in changed} == {"norm", "bias"}
    assert report["trainable_tensors"] == sum(r in ("norm", "bias") for r in roles.values())
    assert report["eval_loss_after"] < report["eval_loss_before"]
    assert out.masks.keys() == pruned.masks.keys() and not check_masks(out)


def test_masked_weight_training_keeps_pruned_weights_zero(pruned):
    out, report = splice.train(pruned, [TEXT[:12000]], eval_data=[TEXT[12000:16000]], steps=12, lr=1e-3,
                               trainable="weights", weight_decay=0.1, **FAST)
    assert report["eval_loss_after"] < report["eval_loss_before"]
    layers = weight_layers(out)
    for key, keep in pruned.masks.items():
        w = dense_weight(out, layers[key])
        assert (w[~keep] == 0).all(), key
        assert not torch.equal(w, dense_weight(pruned, weight_layers(pruned)[key])), key
    assert not check_masks(out)


def test_lora_recovery_folds_into_the_mask(pruned):
    lora = pruned.apply("adapter.lora:rank=4")
    trained, _ = splice.train(lora, [TEXT[:8000]], steps=4, lr=1e-2, **FAST)
    folded = trained.apply("adapter.fold")
    assert not check_masks(folded) and folded.masks.keys() == pruned.masks.keys()


def test_allocate_is_proportional_and_capped():
    assert allocate([1.0, 3.0], [100, 100], 40) == [10, 30]
    assert allocate([1.0, 3.0], [100, 5], 40) == [35, 5]  # the full cluster's rest goes to the other
    assert sum(allocate([0.2, 0.5, 0.3], [7, 7, 7], 10)) == 10
    assert allocate([1.0, 1.0], [3, 3], 50) == [3, 3]


def test_token_clusters_separate_unlike_texts():
    digits = " ".join(str(i % 10) for i in range(4000))
    words = TEXT[:8000]
    ex = text_windows([digits, words], ByteTokenizer(), 64)
    labels = token_clusters(ex, 2)
    first_words = next(i for i, r in enumerate(ex.rows) if any(c > 64 for c in r[0]) and i > 5)
    assert len(set(labels[:5])) == 1 and labels[first_words + 3] != labels[0]


def test_paser_selects_the_most_degraded(qwen2, pruned):
    select = Paser(qwen2, budget=8, clusters=3)
    ex = text_windows([TEXT[:20000]], ByteTokenizer(), 64)
    subset, report = select(pruned, ex)
    assert len(subset) == report["selected"] == 8 and report["candidates"] == len(ex)
    assert report["degradation_selected"] > report["degradation_mean"] > 0
    assert sum(c["selected"] for c in report["clusters"]) == 8
    _, train_report = splice.train(pruned, [TEXT[:20000]], steps=2, lr=1e-3, trainable="norms", select=select, **FAST)
    assert train_report["selection"]["selected"] == 8 and train_report["examples"] == 8


@pytest.mark.parametrize("kw,needle", [
    (dict(trainable="norms,gates"), "^train: trainable must be a comma list of adapters, norms, biases, weights"),
    (dict(trainable="biases"), "^train: no trainable tensors of kind biases"),
])
def test_bad_recovery_options(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        splice.train(captured("llama")[1], [TEXT[:8000]], steps=1, **{**FAST, **kw})


def test_bad_paser_budget(qwen2):
    with pytest.raises(ConfigError, match="^paser: budget and clusters must be positive"):
        Paser(qwen2, budget=0)


def test_cli_recovery_with_paser(capsys, llama_hf_dir, byte_tokenizer, tmp_path):
    data, art, out = tmp_path / "data.txt", tmp_path / "pruned", tmp_path / "recovered"
    data.write_text(TEXT[:16000])
    rc, _, err = run_cli(capsys, "run", llama_hf_dir, "-p", "prune.magnitude:sparsity=0.5", "-o", art)
    assert rc == 0, err
    rc, stdout, err = run_cli(capsys, "train", art, "--data", data, "--trainable", "norms", "--paser", llama_hf_dir,
                              "--paser-budget", 6, "--paser-clusters", 2, "--steps", 3, "--seq-len", 64, "-o", out)
    assert rc == 0, err
    assert "PASER: 6 of" in stdout
    recovered = splice.load(out)
    assert recovered.masks.keys() == splice.load(art).masks.keys() and not check_masks(recovered)
    assert [h["pass"] for h in recovered.history][-1] == "train"
