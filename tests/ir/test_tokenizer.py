"""The tokenizer is resolved once at capture and carried by the graph (through copy and save/load);
eval and train read it through ``splice.ir.tokenizer.graph_tokenizer``, never a frontend
(tests/test_layering.py checks that they import none)."""
import pytest
from zoo_graphs import captured

import splice
from splice.errors import SpliceError
from splice.eval.data import ByteTokenizer
from splice.ir import tokenizer


def test_capture_records_the_tokenizer_and_artifacts_keep_it(llama_hf_dir, tmp_path, monkeypatch):
    g = splice.capture(llama_hf_dir)
    assert g.source["tokenizer"] == {"path": str(llama_hf_dir.resolve()), "gguf_file": None}
    g.save(tmp_path / "art")
    back = splice.load(tmp_path / "art")
    assert back.source["tokenizer"] == g.source["tokenizer"] == g.copy().source["tokenizer"]
    asked = []
    monkeypatch.setattr(tokenizer, "load_tokenizer", lambda path, gguf_file=None: asked.append(path) or ByteTokenizer())
    assert isinstance(tokenizer.graph_tokenizer(back), ByteTokenizer) and asked == [str(llama_hf_dir.resolve())]


def test_missing_tokenizer_is_one_line(llama_hf_dir):
    g = splice.capture(llama_hf_dir)  # the zoo directory has no tokenizer files
    with pytest.raises(SpliceError, match=rf"^perplexity: cannot load the tokenizer of {llama_hf_dir.resolve()}: ") as err:
        tokenizer.graph_tokenizer(g, "perplexity")
    assert "\n" not in str(err.value)
    _, module_graph = captured("llama")
    with pytest.raises(SpliceError, match="^train: model from module source has no tokenizer"):
        tokenizer.graph_tokenizer(module_graph, "train")

