"""A zoo of tiny random-init models for fast tests and demos.

Every model is fp32, in eval mode, built offline from a config (no hub access) with
weights drawn from a fixed seed, and captures with
``torch.export.export(model, (), inputs, dynamic_shapes=dynamic_shapes(zm), strict=False)``.
Sizes are tiny (hidden 64, 2 layers, 4 heads, intermediate 128, vocab 256) and every
``nn.Linear``/``Conv1D`` in-feature count is a multiple of 32, so group-32 quantization
applies everywhere.

    zm = build("llama")
    ep = torch.export.export(zm.model, (), zm.example_inputs,
                             dynamic_shapes=dynamic_shapes(zm), strict=False)
    ep.module()(**zm.make_inputs(batch=3, seq=40))

Text models take ``input_ids``/``attention_mask`` (BERT also ``token_type_ids``) with
dynamic batch and sequence (sequence at most ``max_seq`` = 128, the position-table size).
Image models take ``pixel_values`` [B, 3, 32, 32] with a dynamic batch only; their
``make_inputs`` ignores ``seq`` because ViT's position embeddings fix the image size.
Example inputs use batch 2 so export does not specialise the batch dimension to 1.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, VOCAB, MAX_SEQ = 64, 2, 4, 2, 128, 256, 128
IMAGE, PATCH, LABELS = 32, 8, 10
ATTN = "sdpa"  # both "sdpa" and "eager" export cleanly; sdpa keeps attention one node


@dataclass
class ZooModel:
    name: str
    model: nn.Module
    example_inputs: dict[str, torch.Tensor]
    make_inputs: Callable[..., dict[str, torch.Tensor]]  # (batch, seq, seed=0) -> kwargs
    dynamic: dict[str, dict[int, str]]  # kwarg -> {axis: dim name}
    kind: str  # "decoder" | "encoder" | "vision" | "cnn"
    max_seq: int | None = None  # upper bound of the "seq" dim, if any


def dynamic_shapes(zm: ZooModel) -> dict[str, dict[int, torch.export.Dim]]:
    """``zm.dynamic`` as torch.export ``dynamic_shapes``: one shared Dim per name."""
    dims: dict[str, torch.export.Dim] = {}
    for axes in zm.dynamic.values():
        for name in axes.values():
            if name not in dims:
                dims[name] = torch.export.Dim(name, max=zm.max_seq if name == "seq" else None)
    return {k: {ax: dims[n] for ax, n in axes.items()} for k, axes in zm.dynamic.items()}


def _text_inputs(batch: int, seq: int, seed: int = 0, token_types: bool = False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if token_types:
        out["token_type_ids"] = torch.zeros_like(ids)
    return out


def _image_inputs(batch: int, seq: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=g)}


def _llama(attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_SEQ, tie_word_embeddings=True, use_cache=False,
        attn_implementation=attn))


def _qwen2(attn):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(  # Qwen2 always has q/k/v bias
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_SEQ, tie_word_embeddings=False, use_cache=False,
        attn_implementation=attn))


def _gpt2(attn):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTERMEDIATE,
        n_positions=MAX_SEQ, bos_token_id=0, eos_token_id=0, use_cache=False,
        attn_implementation=attn))


def _bert(attn):
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=INTERMEDIATE,
        max_position_embeddings=MAX_SEQ, attn_implementation=attn))


def _vit(attn):
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE, image_size=IMAGE, patch_size=PATCH,
        num_labels=LABELS, attn_implementation=attn))


class _Block(nn.Module):
    """Depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN, residual add, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (nn.Identity() if cin == cout and stride == 1 else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        y = torch.relu(self.bn1(self.dw(x)))
        return torch.relu(self.bn2(self.pw(y)) + self.short(x))


class TinyCNN(nn.Module):
    """Stem conv+BN+ReLU, two depthwise-separable residual blocks, avg pool, linear."""

    def __init__(self, channels: tuple[int, int] = (32, 64), num_classes: int = LABELS):
        super().__init__()
        c1, c2 = channels
        self.stem = nn.Sequential(nn.Conv2d(3, c1, 3, 1, 1, bias=False), nn.BatchNorm2d(c1), nn.ReLU())
        self.blocks = nn.Sequential(_Block(c1, c1), _Block(c1, c2, stride=2))
        self.fc = nn.Linear(c2, num_classes)

    def forward(self, pixel_values):
        x = self.blocks(self.stem(pixel_values))
        return self.fc(x.mean(dim=(2, 3)))


def _cnn(attn):  # attn is unused: no attention
    m = TinyCNN()
    for bn in m.modules():  # non-trivial BN statistics, so BN folding is actually tested
        if isinstance(bn, nn.BatchNorm2d):
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.normal_(0, 0.1)
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return m


_SPECS = {  # name: (constructor, kind, make_inputs, input kwargs, max_seq)
    "llama": (_llama, "decoder", _text_inputs, ("input_ids", "attention_mask"), MAX_SEQ),
    "qwen2": (_qwen2, "decoder", _text_inputs, ("input_ids", "attention_mask"), MAX_SEQ),
    "gpt2": (_gpt2, "decoder", _text_inputs, ("input_ids", "attention_mask"), MAX_SEQ),
    "bert": (_bert, "encoder", functools.partial(_text_inputs, token_types=True),
             ("input_ids", "attention_mask", "token_type_ids"), MAX_SEQ),
    "vit": (_vit, "vision", _image_inputs, ("pixel_values",), None),
    "cnn": (_cnn, "cnn", _image_inputs, ("pixel_values",), None),
}


def build(name: str, seed: int = 0, attn_implementation: str = ATTN) -> ZooModel:
    """Build zoo model ``name`` with weights from ``seed`` (the global RNG is left alone)."""
    if name not in _SPECS:
        raise KeyError(f"unknown zoo model {name!r}; choose from {', '.join(ZOO_NAMES)}")
    ctor, kind, make_inputs, kwargs, max_seq = _SPECS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ctor(attn_implementation).to(torch.float32).eval()
    text = max_seq is not None
    dynamic = {k: ({0: "batch", 1: "seq"} if text else {0: "batch"}) for k in kwargs}
    return ZooModel(name, model, make_inputs(2, 16), make_inputs, dynamic, kind, max_seq)


ZOO_NAMES: tuple[str, ...] = tuple(_SPECS)
ZOO: dict[str, Callable[..., ZooModel]] = {n: functools.partial(build, n) for n in ZOO_NAMES}
