"""Capture a local transformers model: an HF directory (config.json + weights) or a GGUF file.

Example inputs are built from the config (token ids and masks for text models, pixel values
for vision models) and the model is loaded in fp32 with ``use_cache=False`` and SDPA
attention, then captured like any ``nn.Module``. Nothing is downloaded. Where the tokenizer
lives (the directory, or the GGUF file) is recorded in the graph's source at capture
(``ir/tokenizer.py``), so eval and train never come back here for it.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

from splice.errors import CaptureError, SpliceError
from splice.frontends.torch_export import capture_module
from splice.ir.graph import Graph
from splice.ir.tokenizer import tokenizer_source
from splice.progress import phase


def find_gguf(path: Path) -> tuple[Path, str | None]:
    """(model directory, gguf file name or None) for a directory or a ``.gguf`` path."""
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if (path / "config.json").is_file():
        return path, None
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return path, ggufs[0].name
    if len(ggufs) > 1:
        raise SpliceError(f"{path}: several .gguf files ({', '.join(g.name for g in ggufs)}); pass one of them")
    raise SpliceError(f"{path}: not a model directory (no config.json, .gguf file or splice manifest.json)")


def load_hf_model(path: Path) -> torch.nn.Module:
    import transformers

    directory, gguf = find_gguf(path)
    kw = {"gguf_file": gguf} if gguf else {}
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True, **kw)
    except Exception as e:
        raise SpliceError(f"{path}: cannot read the model config: {str(e).splitlines()[0]}") from e
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    # GGUF files hold decoder LMs and their configs name no architecture
    cls = cls or (transformers.AutoModelForCausalLM if gguf else transformers.AutoModel)
    config.use_cache = False
    try:
        with phase(f"load {gguf} (GGUF dequantization)" if gguf else f"load {directory.name} weights"):
            model = cls.from_pretrained(directory, config=config, local_files_only=True, dtype=torch.float32,
                                        attn_implementation="sdpa", **kw)
    except Exception as e:
        raise SpliceError(f"{path}: cannot load {cls.__name__}: {str(e).splitlines()[0]}") from e
    return model.eval()


def example_inputs_for(model: torch.nn.Module, batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    """Inputs a forward of ``model`` accepts, shaped from its config."""
    cfg = model.config
    params = inspect.signature(model.forward).parameters
    g = torch.Generator().manual_seed(0)
    if "pixel_values" in params:
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        return {"pixel_values": torch.randn(batch, cfg.num_channels, size, size, generator=g)}
    vocab = getattr(cfg, "vocab_size", None) or 1000
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    inputs = {"input_ids": ids}
    if "attention_mask" in params:
        inputs["attention_mask"] = torch.ones_like(ids)
    if "token_type_ids" in params and getattr(cfg, "type_vocab_size", 0):
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


def max_positions(config) -> int | None:
    """The longest sequence the model's positions allow, when its config says (calibration sizes)."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def capture_hf(path: str | Path) -> Graph:
    path = Path(path)
    model = load_hf_model(path)
    directory, gguf = find_gguf(path)
    source = {"kind": "hf", "path": str(directory.resolve()), "gguf_file": gguf,
              "name": (gguf or directory.name), "model_type": model.config.model_type,
              "tokenizer": tokenizer_source(str(directory.resolve()), gguf),  # the graph carries it
              "max_positions": max_positions(model.config)}
    try:
        with phase(f"torch.export {source['name']}"):
            return capture_module(model, example_inputs_for(model), dynamic=True, source=source)
    except CaptureError as e:
        raise CaptureError(f"{path}: {e}") from e
