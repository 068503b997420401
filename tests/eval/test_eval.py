"""splice.eval.perplexity: strided perplexity against the HF guide's loop, known values, and
the per-layer SQNR report."""
import math

import pytest
import torch

import splice
from splice.errors import ConfigError, SpliceError
from splice.eval import zoo
from splice.eval.data import ByteTokenizer, builtin_text
from splice.eval.perplexity import layer_sqnr, perplexity, windows
from zoo_graphs import captured

TEXT = builtin_text("gpl3")


def random_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, zoo.VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trained():
    """The tiny llama trained briefly on GPL-3 bytes (well below uniform perplexity), captured;
    plus held-out token ids."""
    zm = zoo.build("llama")
    model = zm.model
    ids = torch.tensor(list(TEXT.encode()))
    train, held = ids[:-3000], ids[-3000:]
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is fastest, and immune to oversubscribed cores
    try:
        for _ in range(150):
            starts = torch.randint(0, len(train) - 65, (16,), generator=gen)
            x = torch.stack([train[s:s + 64] for s in starts])
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return splice.capture(model, zm.example_inputs), held.unsqueeze(0)


# ------------------------------------------------------------------------- windows


@pytest.mark.parametrize("n,seq,stride", [(10, 4, 4), (10, 4, 2), (9, 4, 4), (100, 32, 7), (5, 8, 8), (64, 64, 1)])
def test_windows_score_each_token_once(n, seq, stride):
    spans = windows(n, seq, stride)
    scored = [t for _, end, first in spans for t in range(first, end)]
    assert scored == sorted(set(scored))  # once each, in order
    for begin, end, first in spans:
        assert end - begin <= seq and begin < first  # every scored token has context in its window
    if stride < seq:  # overlapping windows: only the very first token goes unscored
        assert scored == list(range(1, n))
    assert spans[0][0] == 0 and all(b % stride == 0 for b, _, _ in spans)


# ---------------------------------------------------------------------- known values


def test_uniform_model_has_vocab_perplexity():
    zm = zoo.build("qwen2")  # untied: zeroing lm_head leaves the body alone
    with torch.no_grad():
        zm.model.lm_head.weight.zero_()
    graph = splice.capture(zm.model, zm.example_inputs)
    ids = random_ids(200)
    for stride in (None, 16):
        r = perplexity(graph, ids, seq_len=64, stride=stride)
        assert r["ppl"] == pytest.approx(zoo.VOCAB, rel=1e-6)
        assert r["nll"] == pytest.approx(math.log(zoo.VOCAB), rel=1e-6)
    assert perplexity(graph, ids, seq_len=64)["tokens"] == 63 * 3 + 7  # windows at 0, 64, 128, 192 (8 tokens)


def hf_guide(model, ids: torch.Tensor, seq_len: int, stride: int) -> tuple[float, int]:
    """The HF perplexity guide's loop with the model's own loss; tokens counted exactly
    (labels that survive the shift) instead of the guide's ``num_valid - batch_size``."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    n = ids.size(1)
    for begin in range(0, n, stride):
        end = min(begin + seq_len, n)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        valid = int((target[:, 1:] != -100).sum())
        if valid:
            with torch.no_grad():
                loss = model(input_ids=input_ids, labels=target).loss
            nll_sum += float(loss) * valid
            n_tokens += valid
        prev_end = end
        if end == n:
            break
    return nll_sum / n_tokens, n_tokens


@pytest.mark.parametrize("seq_len,stride", [(32, 32), (32, 8), (48, 20), (300, 300)])
def test_matches_hf_guide(seq_len, stride):
    zm, graph = captured("llama")
    ids = random_ids(300, seed=1)
    nll, tokens = hf_guide(zm.model, ids, seq_len, stride)
    r = perplexity(graph, ids, seq_len=seq_len, stride=stride)
    assert r["tokens"] == tokens
    assert r["nll"] == pytest.approx(nll, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_single_window_is_one_full_forward():
    _, graph = captured("llama")
    ids = random_ids(100, seed=2)
    logits = graph.run(ids, torch.ones_like(ids))["logits"]
    nll = float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]))
    r = perplexity(graph, ids, seq_len=100)
    assert r["windows"] == 1 and r["tokens"] == 99 and r["nll"] == pytest.approx(nll, rel=1e-5)


def test_batching_text_and_max_tokens_agree():
    _, graph = captured("llama")
    text = TEXT[:1000]
    ids = torch.tensor([list(text.encode())])
    one = perplexity(graph, ids, seq_len=64, stride=48)
    assert perplexity(graph, ids, seq_len=64, stride=48, batch_size=5)["nll"] == pytest.approx(one["nll"], rel=1e-6)
    assert perplexity(graph, text, tokenizer=ByteTokenizer(), seq_len=64, stride=48) == one
    assert perplexity(graph, ids[0].tolist(), seq_len=64, stride=48) == one
    assert perplexity(graph, TEXT[:5000], tokenizer=ByteTokenizer(), seq_len=64, stride=48, max_tokens=1000) == one


def test_trained_model_context_and_quantization(trained):
    graph, held = trained
    fp = perplexity(graph, held, seq_len=64)  # trained on 64-token windows
    assert fp["ppl"] < 40  # learned something (uniform is 256)
    overlapped = perplexity(graph, held, seq_len=64, stride=16)
    assert overlapped["ppl"] < fp["ppl"]  # every token now has >= 48 tokens of context
    q = {b: perplexity(graph.apply(f"quantize.rtn:bits={b},group_size=32"), held, seq_len=64)["ppl"]
         for b in (2, 3, 8)}
    assert q[8] == pytest.approx(fp["ppl"], rel=0.01)
    assert q[3] > fp["ppl"] * 0.99
    assert q[2] > fp["ppl"] * 1.05 and q[2] > q[3]


# -------------------------------------------------------------------------- errors


def test_errors():
    _, graph = captured("llama")
    with pytest.raises(SpliceError, match="text too short: 50 tokens, need at least 64"):
        perplexity(graph, random_ids(50), seq_len=64)
    with pytest.raises(ConfigError, match="stride 65 is larger than seq_len 64"):
        perplexity(graph, random_ids(100), seq_len=64, stride=65)
    with pytest.raises(ConfigError, match="seq_len must be a positive integer"):
        perplexity(graph, random_ids(100), seq_len=0)
    with pytest.raises(ConfigError, match=r"\[1, T\]"):
        perplexity(graph, random_ids(100).expand(2, -1), seq_len=32)
    _, bert = captured("bert")
    with pytest.raises(SpliceError, match="no 'logits' output .*last_hidden_state"):
        perplexity(bert, random_ids(100), seq_len=32)
    with pytest.raises(SpliceError, match="tokenizer"):  # a module-captured graph has no tokenizer
        perplexity(graph, TEXT[:500], seq_len=32)
    for exc in (SpliceError, ConfigError):
        try:
            perplexity(graph, random_ids(10), seq_len=64, stride=128 if exc is ConfigError else None)
        except exc as e:
            assert "\n" not in str(e)


# ----------------------------------------------------------------------- layer SQNR


def test_layer_sqnr_identical_graphs_is_inf():
    _, graph = captured("llama")
    samples = [{"input_ids": random_ids(20, seed=s)} for s in range(2)]
    rows = layer_sqnr(graph, graph.copy(), samples)
    assert len(rows) == sum(1 for _ in graph.nodes("linear")) == 15
    assert all(r["sqnr_db"] == math.inf and r["max_abs"] == 0 and r["cosine"] == pytest.approx(1.0) for r in rows)
    assert rows[0]["path"] == "model.layers.0.self_attn.q_proj" and rows[-1]["path"] == "lm_head"


def test_layer_sqnr_quantized(trained):
    graph, held = trained
    q3 = graph.apply("quantize.rtn:bits=3,group_size=32")
    q8 = graph.apply("quantize.rtn:bits=8,group_size=32,targets=!lm_head")
    samples = [(held[:, :64], torch.ones(1, 64, dtype=torch.long)), {"input_ids": held[:, 64:128]}]
    r3, r8 = layer_sqnr(graph, q3, samples), layer_sqnr(graph, q8, samples)
    assert [r["path"] for r in r3] == [r["path"] for r in r8]
    assert all(r["op_ref"] == "aten.linear" and r["op_test"] == "splice.qlinear" for r in r3)
    assert all(0 < r["sqnr_db"] < math.inf for r in r3)
    by8 = {r["path"]: r for r in r8}
    assert by8["lm_head"]["op_test"] == "aten.linear"
    assert all(by8[r["path"]]["sqnr_db"] > r["sqnr_db"] + 10 for r in r3)  # 8-bit far closer than 3-bit
    # the first layer sees identical inputs: its output SQNR is the weight-only error
    first = r3[0]["path"]
    assert by8[first]["sqnr_db"] > 35


def test_layer_sqnr_errors():
    _, llama = captured("llama")
    _, cnn = captured("cnn")
    with pytest.raises(SpliceError, match="no linear layer .* matches"):
        layer_sqnr(llama, cnn, [{"input_ids": random_ids(8)}])
    with pytest.raises(SpliceError, match="no samples"):
        layer_sqnr(llama, llama, [])
