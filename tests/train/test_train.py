"""splice.train and `splice train`: loss goes down, only adapters change, resume is exact,
gradient accumulation is equivalent, hooks run, bad inputs give one-line errors.

Runs on the tiny zoo models with the byte tokenizer (vocab 256 = the zoo's) and one torch
thread (the tiny ops are dominated by thread hand-off on a loaded 2-core machine).
"""
import json

import pytest
import torch
from zoo_graphs import fast_train, assert_error, captured, run_cli

import splice
from splice.errors import ConfigError, SpliceError
from splice.eval.data import ByteTokenizer, builtin_text
from splice.ir.train_hooks import TrainHook, register_train_hook
from splice.train.checkpoint import checkpoint_path

TEXT = builtin_text("gpl3")
TRAIN, HELD_OUT = TEXT[:20000], TEXT[20000:26000]
FAST = fast_train()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llama():
    return captured("llama")[1]


@pytest.fixture(scope="module")
def lora(llama):
    return llama.apply("adapter.lora:rank=8")


@pytest.fixture(scope="module")
def trained(lora):
    before = {k: v.detach().clone() for k, v in lora.tensors().items()}
    out, report = splice.train(lora, [TRAIN], eval_data=[HELD_OUT], steps=40, lr=2e-2, **FAST)
    return before, out, report


# ------------------------------------------------------------------------------ behaviour


def test_loss_decreases(trained):
    _, _, report = trained
    assert report["eval_loss_after"] < report["eval_loss_before"] - 0.1, report
    assert report["train_loss_last"] < report["train_loss_first"], report
    assert len(report["history"]) == 40 and report["evals"][0]["step"] == 0


def test_only_adapter_tensors_change(lora, trained):
    before, out, report = trained
    adapters = set(splice.adapter_parameters(lora))
    assert report["trainable_tensors"] == len(adapters) > 0
    for name, value in lora.tensors().items():
        assert torch.equal(value, before[name]), f"input graph changed: {name}"
    for name, value in out.tensors().items():
        if name in adapters:
            assert value.requires_grad
        else:
            assert value is lora.tensor(name), f"base tensor {name} was copied or changed"
    changed = [n for n in adapters if not torch.equal(out.tensor(n), before[n])]
    assert len(changed) == len(adapters)  # every A and B moved (B from zero)


def test_weights_trained_whole_stay_frozen_for_a_later_adapter_run(llama):
    whole, _ = splice.train(llama, [TRAIN], steps=2, lr=1e-3, trainable="weights", **FAST)
    assert not any(v.requires_grad for v in whole.tensors().values())  # trained, but not marked trainable
    tuned, report = splice.train(whole.apply("adapter.lora:rank=8"), [TRAIN], steps=2, lr=1e-2, **FAST)
    assert report["trainable_params"] == sum(p.numel() for p in splice.adapter_parameters(tuned).values())
    for name, value in whole.tensors().items():
        assert tuned.tensor(name) is value, f"{name} was trained by the adapter run"


def test_trained_graph_saves_with_history(trained, tmp_path):
    _, out, report = trained
    out.save(tmp_path / "art")
    loaded = splice.load(tmp_path / "art")
    entry = loaded.history[-1]
    assert entry["pass"] == "train" and entry["config"]["steps"] == 40 and entry["config"]["lr"] == 2e-2
    assert entry["report"]["eval_loss_after"] == pytest.approx(report["eval_loss_after"])
    x = out.example_inputs
    torch.testing.assert_close(loaded.run(*x)["logits"], out.run(*x)["logits"], atol=1e-6, rtol=0)
    # a loaded artifact trains again: its adapter tensors are found by role
    again, _ = splice.train(loaded, [TRAIN], steps=1, lr=1e-3, **FAST)
    assert [h["pass"] for h in again.history][-2:] == ["train", "train"]


class _StopAt(TrainHook):
    def __init__(self, step):
        self.step = step

    def after_step(self, step, total):
        if step == self.step:
            raise KeyboardInterrupt


def test_resume_is_exact(llama, tmp_path):
    g = llama.apply("adapter.lora:rank=4,dropout=0.1")  # dropout: the RNG state is restored too
    kw = dict(steps=6, lr=1e-2, checkpoint_every=3, **FAST)
    full, full_report = splice.train(g, [TRAIN], **kw)
    with pytest.raises(KeyboardInterrupt):
        splice.train(g, [TRAIN], checkpoint_dir=tmp_path, hooks=[_StopAt(4)], **kw)
    assert json.loads((checkpoint_path(tmp_path) / "run.json").read_text())["steps"] == 6
    resumed, report = splice.train(g, [TRAIN], checkpoint_dir=tmp_path, resume=True, **kw)
    assert [h["loss"] for h in report["history"]] == [h["loss"] for h in full_report["history"]]
    for name in splice.adapter_parameters(g):
        assert torch.equal(resumed.tensor(name), full.tensor(name)), name
    with pytest.raises(SpliceError, match="different run .*lr 0.01 there, 0.02 here"):
        splice.train(g, [TRAIN], checkpoint_dir=tmp_path, resume=True, **{**kw, "lr": 2e-2})


def test_grad_accumulation_matches_a_larger_batch(lora):
    kw = dict(steps=3, lr=1e-3, seq_len=64, tokenizer=ByteTokenizer(), progress=False)
    big, rep_big = splice.train(lora, [TRAIN], batch_size=4, grad_accum=1, **kw)
    acc, rep_acc = splice.train(lora, [TRAIN], batch_size=2, grad_accum=2, **kw)
    for a, b in zip(rep_big["history"], rep_acc["history"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    for name in splice.adapter_parameters(lora):
        torch.testing.assert_close(acc.tensor(name), big.tensor(name), atol=1e-5, rtol=0)


class _Recorder(TrainHook):
    """An L2 penalty on the A matrices; records every call."""

    def __init__(self, graph, coef):
        self.params = [p for n, p in splice.adapter_parameters(graph).items() if n.endswith(".A")]
        self.coef, self.calls = coef, []

    def regularizer(self, step, total):
        self.calls.append(("regularizer", step, total))
        return self.coef * sum(p.square().sum() for p in self.params)

    def after_backward(self, step, total):
        assert all(p.grad is not None for p in self.params)
        self.calls.append(("after_backward", step, total))

    def after_step(self, step, total):
        self.calls.append(("after_step", step, total))


def test_hooks_are_called_and_the_regularizer_counts(lora):
    made = []

    @register_train_hook
    def factory(graph):  # only for graphs marked for this test
        if graph.source.get("hook_test"):
            made.append(_Recorder(graph, 1.0))
            return made[-1]
        return None

    marked = lora.copy()
    marked.source["hook_test"] = True
    plain, _ = splice.train(lora, [TRAIN], steps=4, lr=1e-2, **FAST)
    assert not made
    reg, report = splice.train(marked, [TRAIN], steps=4, lr=1e-2, grad_accum=2, **FAST)
    (hook,) = made
    kinds = [c[0] for c in hook.calls]
    assert kinds.count("regularizer") == 8 and kinds.count("after_backward") == kinds.count("after_step") == 4
    assert hook.calls[-1] == ("after_step", 3, 4)
    def a_norm(g):
        return sum(float(t.detach().square().sum()) for n, t in splice.adapter_parameters(g).items() if n.endswith(".A"))

    assert report["history"][0]["regularizer"] == pytest.approx(a_norm(lora), rel=1e-5)
    assert a_norm(reg) < a_norm(plain)


def test_adapter_dropout_is_applied_in_training_only(llama):
    g = llama.apply("adapter.lora:rank=4,dropout=0.5,init=random")
    from splice.train.loop import add_adapter_dropout

    work = g.copy()
    assert add_adapter_dropout(work) == len(splice.list_adapters(g))
    x = g.example_inputs
    torch.manual_seed(0)
    assert not torch.allclose(work.gm(*x)[0], g.gm(*x)[0])  # dropout active in the training copy
    assert "aten.dropout" not in g.op_counts()


# -------------------------------------------------------------------- other losses


def test_embedding_loss_decreases(tmp_path):
    bert = captured("bert")[1].apply("adapter.lora:rank=8")
    pairs = [{"anchor": TEXT[i:i + 40], "positive": TEXT[i + 40:i + 80]} for i in range(0, 6400, 100)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in pairs))
    _, report = splice.train(bert, path, loss="embedding", eval_data=path, steps=30, lr=3e-2,
                             **{**FAST, "batch_size": 16})
    assert report["eval_loss_after"] < report["eval_loss_before"] - 0.2, report


def test_classification_loss_decreases():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=2)).eval()
    ids = torch.randint(0, 256, (2, 8))
    g = splice.capture(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}).apply(
        "adapter.lora:rank=2,targets=linear")
    records = [{"text": w, "label": int(w[0] in "aeiou")} for w in TEXT[:4000].split() if w.isalpha()][:64]
    _, report = splice.train(g, records, loss="classification", eval_data=records, steps=30, lr=2e-2, **FAST)
    assert report["eval_loss_after"] < report["eval_loss_before"] - 0.05, report


# ---------------------------------------------------------------------- bad inputs (API)


def test_no_adapter(llama):
    with pytest.raises(ConfigError, match=r"^train: no trainable tensors of kind adapters \(add an adapter first"):
        splice.train(llama, [TRAIN], steps=1, **FAST)


@pytest.mark.parametrize("content,needle", [(b"", "file is empty"), (b"\x00\x01\x02binary", "not a text file"),
                                            (b"\xff\xfe\xfa", "not a UTF-8 text file")])
def test_bad_data_file(lora, tmp_path, content, needle):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    with pytest.raises(SpliceError, match=needle) as e:
        splice.train(lora, path, steps=1, **FAST)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kw,needle", [
    (dict(loss="embedding"), "needs a 'last_hidden_state' output"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(schedule="step"), "schedule must be one of"),
    (dict(resume=True), "resume needs checkpoint_dir"),
    (dict(seq_len=100000), "text too short"),
])
def test_bad_options(lora, kw, needle):
    with pytest.raises(SpliceError, match=needle):
        splice.train(lora, [TRAIN], **{**dict(steps=1, **FAST), **kw})


def test_bad_jsonl(tmp_path):
    bert = captured("bert")[1].apply("adapter.lora:rank=4")
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"anchor": "a", "positive": "b"}\n{"anchor": "a"}\n')
    with pytest.raises(SpliceError, match=rf"{path}:2: expected a JSON object"):
        splice.train(bert, path, loss="embedding", steps=1, **FAST)
    path.write_text("not json\n")
    with pytest.raises(SpliceError, match=rf"{path}:1: not a JSON line"):
        splice.train(bert, path, loss="embedding", steps=1, **FAST)


# ------------------------------------------------------------------------------------ CLI


@pytest.fixture
def text_files(tmp_path):
    train, held = tmp_path / "train.txt", tmp_path / "held.txt"
    train.write_text(TRAIN)
    held.write_text(HELD_OUT)
    return train, held


def test_cli_train(capsys, llama_hf_dir, text_files, byte_tokenizer, tmp_path):
    out = tmp_path / "trained"
    rc, stdout, err = run_cli(capsys, "train", llama_hf_dir, "--data", text_files[0], "--eval", text_files[1],
                              "-p", "adapter.lora:rank=4", "--steps", 5, "--lr", 1e-2, "--seq-len", 64,
                              "--checkpoint-dir", tmp_path / "ckpt", "-o", out)
    assert rc == 0, err
    assert "held-out loss" in stdout and "saved artifact" in stdout
    assert [h["pass"] for h in splice.load(out).history] == ["adapter.lora", "train"]
    assert (checkpoint_path(tmp_path / "ckpt") / "trainable.safetensors").is_file()
    rc, stdout, err = run_cli(capsys, "train", llama_hf_dir, "--data", text_files[0], "-p", "adapter.lora:rank=4",
                              "--steps", 5, "--lr", 1e-2, "--seq-len", 64, "--checkpoint-dir", tmp_path / "ckpt",
                              "--resume", "-o", tmp_path / "again")
    assert rc == 0, err


def test_cli_no_adapter(capsys, llama_hf_dir, text_files, byte_tokenizer, tmp_path):
    out = tmp_path / "out"
    assert_error(capsys, ["train", llama_hf_dir, "--data", text_files[0], "--steps", 2, "-o", out],
                 "no trainable tensors", absent=[out])


@pytest.mark.parametrize("content,needle", [(b"", "file is empty"), (b"\x00binary", "not a text file")])
def test_cli_bad_data(capsys, llama_hf_dir, tmp_path, content, needle, monkeypatch):
    data, out = tmp_path / "data.txt", tmp_path / "out"
    data.write_bytes(content)
    monkeypatch.setattr(splice, "capture", lambda *a, **k: pytest.fail("captured before the data was checked"))
    assert_error(capsys, ["train", llama_hf_dir, "--data", data, "-p", "adapter.lora", "-o", out],
                 needle, data, absent=[out])


def test_cli_bad_options(capsys, llama_hf_dir, text_files, tmp_path):
    out = tmp_path / "out"
    assert_error(capsys, ["train", llama_hf_dir, "--data", text_files[0], "--resume", "-o", out],
                 "--resume needs --checkpoint-dir", rc=2, absent=[out])
    assert_error(capsys, ["train", llama_hf_dir, "--data", text_files[0], "--lr", -1, "-o", out],
                 "lr must be > 0", absent=[out])


def test_cli_help(capsys):
    rc, out, _ = run_cli(capsys, "train", "--help")
    assert rc == 0 and "usage: splice train" in out and "--checkpoint-dir" in out
