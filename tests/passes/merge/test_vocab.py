"""``tokenizer_source`` (``passes/merge/vocab.py``): models whose tokenizers differ — one with added
tokens (more embedding rows), one with two tokens' ids swapped — merge token by token onto the base's,
a given or the union vocabulary; the same YAML through mergekit gives the same logits per token; the
union tokenizer travels in the artifact and the ``--hf`` directory."""
import pytest
import torch
import yaml
from zoo_graphs import run_cli

import splice
from splice.eval import zoo
from splice.ir.tokenizer import graph_tokenizer
from splice.passes.merge.vocab import permuted, vocabulary_tensors

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ADDED = ["<x1>", "<x2>"]


def _tokenizer(order: list[str], added=()):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(order)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")
    fast.add_tokens(list(added), special_tokens=True)
    return fast


@pytest.fixture(scope="module")
def vocab_dirs(tmp_path_factory):
    """m0: tokens t0..t{V-1}; m1: another model with two added tokens (two more embedding rows); m2:
    m0 with t1 and t2 swapped (ids and embedding rows: the same model under another vocabulary)."""
    root = tmp_path_factory.mktemp("vocab")
    base = zoo.build("llama", seed=0).model
    words = [f"t{i}" for i in range(base.config.vocab_size)]
    for i, (seed, order, added) in enumerate([(0, words, ()), (1, words, ADDED),
                                              (0, [words[0], words[2], words[1], *words[3:]], ())]):
        model = zoo.build("llama", seed=seed).model
        if added:
            model.resize_token_embeddings(len(words) + len(added))
            with torch.no_grad():
                model.get_input_embeddings().weight[len(words):] = torch.randn(len(added), model.config.hidden_size)
        if i == 2:
            with torch.no_grad():
                for t in {id(t): t for t in (model.get_input_embeddings().weight,
                                             model.get_output_embeddings().weight)}.values():  # tied: once
                    t[[1, 2]] = t[[2, 1]].clone()
        model.save_pretrained(root / f"m{i}")
        _tokenizer(order, added).save_pretrained(root / f"m{i}")
    return root


def _logits_by_token(model_or_graph, tokenizer, text: str) -> dict[str, torch.Tensor]:
    """Logits at the last position, keyed by token string (ids differ between vocabularies)."""
    ids = torch.tensor([tokenizer.convert_tokens_to_ids(text.split())])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        if isinstance(model_or_graph, splice.Graph):
            logits = model_or_graph.run(ids, mask)["logits"]
        else:
            logits = model_or_graph(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return {t: logits[0, -1, i] for t, i in tokenizer.get_vocab().items()}


def test_permuted_rows_follow_mergekit():
    a, b, c = (torch.arange(3.0).view(3, 1) + 10 * k for k in range(3))
    perms = [torch.tensor([0, 1, -1, -1]), torch.tensor([1, 0, 2, -1]), torch.tensor([0, -1, 1, -1])]
    out = permuted([a, b, c], perms, base=0)
    # token 2: only in b and c, no base -> their average; token 3: nobody -> zeros; token 1 in a, b: own rows
    assert out[0].flatten().tolist() == [0.0, 1.0, (12 + 21) / 2, 0.0]
    assert out[2].flatten().tolist() == [20.0, 1.0, 21.0, 0.0]  # c lacks token 1: the base's row
    assert [t.shape for t in out] == [(4, 1)] * 3


@pytest.mark.parametrize("source", ["union", "base"])
def test_mergekit_parity_per_token(source, vocab_dirs, tmp_path, capsys):
    mergekit = pytest.importorskip("mergekit.merge", reason="mergekit is not installed (pip install splice[test])")
    from mergekit.config import MergeConfiguration
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = [str(vocab_dirs / f"m{i}") for i in range(3)]
    recipe = {"merge_method": "ties", "base_model": m[0], "dtype": "float32", "tokenizer_source": source,
              "parameters": {"density": 0.7},
              "models": [{"model": m[1], "parameters": {"weight": 0.6}}, {"model": m[2], "parameters": {"weight": 0.4}}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    mergekit.run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "mk"), mergekit.MergeOptions())
    rc, _, err = run_cli(capsys, "merge", path, "-o", tmp_path / "sp", "--hf", tmp_path / "hf")
    assert rc == 0, err
    ours = splice.load(tmp_path / "sp")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "mk", dtype=torch.float32).eval()
    their_tok = AutoTokenizer.from_pretrained(tmp_path / "mk")
    tok = graph_tokenizer(ours)
    assert set(tok.get_vocab()) == set(their_tok.get_vocab())
    assert (set(ADDED) <= set(tok.get_vocab())) == (source == "union")
    text = "t5 t1 t2 <x1> t9" if source == "union" else "t5 t1 t2 t9"
    a, b = _logits_by_token(ours, tok, text), _logits_by_token(theirs, their_tok, text)
    assert max(float((a[t] - b[t]).abs()) for t in a) <= 1e-5
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    c = _logits_by_token(reloaded, hf_tok, text)
    assert max(float((a[t] - c[t]).abs()) for t in a) <= 1e-5


def test_swapped_ids_merge_token_by_token(vocab_dirs):
    """m2 is m0 with two ids swapped: merged on m0's vocabulary it is m0 again, without alignment it is not."""
    g0, g2 = (splice.capture(vocab_dirs / f"m{i}") for i in (0, 2))
    aligned = splice.merge([g0, g2], "linear", weight=1.0, tokenizer_source="base")
    naive = splice.merge([g0, g2], "linear", weight=1.0)
    table = vocabulary_tensors(g0)[0]
    assert torch.equal(aligned.tensor(table), g0.tensor(table))
    assert not torch.equal(naive.tensor(table), g0.tensor(table))


def test_bad_tokenizer_source(vocab_dirs):
    from splice.errors import ConfigError, SpliceError

    g0 = splice.capture(vocab_dirs / "m0")
    with pytest.raises(ConfigError, match="^merge: tokenizer_source: input index 5 out of range"):
        splice.merge([g0, g0], "linear", tokenizer_source=5)
    with pytest.raises(ConfigError, match="^merge: tokenizer_source: cannot load a tokenizer from '/nonexistent'"):
        splice.merge([g0, g0], "linear", tokenizer_source="/nonexistent")
    bare = zoo.build("llama")
    plain = splice.capture(bare.model, bare.example_inputs)
    with pytest.raises(SpliceError, match=r"^merge: tokenizer_source \(input 'model 1'\): model from"):
        splice.merge([g0, plain], "linear", tokenizer_source="union")
