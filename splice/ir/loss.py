"""The label-free loss of a graph on calibration samples, and the loss along the straight line
between two weight sets (linear mode connectivity: Frankle et al., https://arxiv.org/abs/1912.05671).

The loss needs no labels: next-token cross-entropy of ``logits`` on the calibration tokens for a
language model (LLM-Pruner's, https://arxiv.org/abs/2305.11627), cross-entropy against the model's
own top prediction for a classifier (a CNN's or ViT's class scores). A masked language model (a
graph whose ``source["masked_lm"]`` holds a ``masking_spec``, as ``splice.train`` records after
``loss="masked_lm"``) is scored by its own objective instead: masked-token cross-entropy of ``logits``
on BERT's masking of the sample (``mask_tokens``), drawn from a seed fixed by the sample's tokens so
every model sees the same masked positions. A graph with none of these (a bare encoder's hidden
states) has no such loss and is refused.

A path's *barrier* is the largest excess of the loss over the straight line between the endpoints'
losses, ``max_α loss(α) − ((1 − α)·loss(0) + α·loss(1))`` (Ainsworth et al.,
https://arxiv.org/abs/2209.04836): 0 when the models are linearly mode connected.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from splice.errors import ConfigError
from splice.ir.graph import Graph, set_attr

Loss = Callable[[Graph, tuple, tuple], torch.Tensor]  # (graph, sample, its outputs) -> scalar


def has_label_free_loss(graph: Graph) -> bool:
    """Whether ``calibration_loss`` applies: a 3-D ``logits`` over ``input_ids``, or 2-D class scores first."""
    out = next(n for n in graph.gm.graph.nodes if n.op == "output").args[0]
    vals = [getattr(a, "meta", {}).get("val") for a in (out if isinstance(out, (tuple, list)) else [out])]
    shapes = dict(zip(graph.output_names, [None if v is None else v.dim() for v in vals]))
    if "logits" in shapes and "input_ids" in graph.input_names and shapes["logits"] == 3:
        return True
    return bool(vals) and vals[0] is not None and vals[0].dim() == 2 and vals[0].is_floating_point()


MASK_PROB = 0.15  # BERT's share of masked tokens, of which 80 % [MASK], 10 % a random token, 10 % unchanged


def masking_spec(tokenizer) -> dict:
    """What ``mask_tokens`` needs from a tokenizer: the mask id, the vocabulary size, the special ids."""
    if getattr(tokenizer, "mask_token_id", None) is None:
        raise ConfigError("masked_lm: the tokenizer has no mask token")
    return {"mask_token_id": int(tokenizer.mask_token_id), "vocab_size": len(tokenizer),
            "special_ids": sorted(int(i) for i in tokenizer.all_special_ids)}


def mask_tokens(ids: torch.Tensor, attention_mask: torch.Tensor | None, spec: dict,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking (``transformers``' ``DataCollatorForLanguageModeling``): each non-special,
    non-padding token chosen with probability 0.15 (at least one a row), of those 80 % replaced by
    the mask token, 10 % by a random token, 10 % kept. Returns ``(masked ids, labels)``: labels are
    the original ids at the chosen positions and -100 elsewhere."""
    eligible = ~torch.isin(ids, torch.tensor(spec["special_ids"], dtype=ids.dtype))
    if attention_mask is not None:
        eligible &= attention_mask.bool()
    draw = torch.rand(ids.shape, generator=generator)
    chosen = (draw < MASK_PROB) & eligible
    first = torch.where(eligible, draw, torch.inf).argmin(-1, keepdim=True)  # a row without a choice: its lowest draw
    chosen |= torch.zeros_like(chosen).scatter(-1, first, True) & eligible & ~chosen.any(-1, keepdim=True)
    how = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(spec["vocab_size"], ids.shape, generator=generator, dtype=ids.dtype)
    masked = torch.where(chosen & (how < 0.8), torch.full_like(ids, spec["mask_token_id"]), ids)
    masked = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, masked)
    return masked, ids.masked_fill(~chosen, -100)


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` [B, S, V] over the positions whose label is not -100."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def _sample_seed(ids: torch.Tensor) -> int:
    return int((ids.long() * torch.arange(1, ids.numel() + 1).view_as(ids)).sum()) % (2 ** 31)


def calibration_loss(graph: Graph, sample: tuple, outputs, who: str) -> torch.Tensor:
    """The label-free loss of ``outputs`` (the graph's outputs on ``sample``; see the module docstring)."""
    if "logits" in graph.output_names and "input_ids" in graph.input_names:
        logits = outputs[graph.output_names.index("logits")]
        ids = sample[graph.input_names.index("input_ids")]
        spec = graph.source.get("masked_lm")
        if spec and logits.dim() == 3:  # re-run on the masked sample: the outputs given saw it unmasked
            inputs = list(sample)
            mask = sample[graph.input_names.index("attention_mask")] if "attention_mask" in graph.input_names else None
            inputs[graph.input_names.index("input_ids")], labels = mask_tokens(
                ids, mask, spec, torch.Generator().manual_seed(_sample_seed(ids)))
            return masked_lm_loss(graph.gm(*inputs)[graph.output_names.index("logits")], labels)
        if logits.dim() == 3:
            return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    first = outputs[0]
    if first.dim() == 2 and first.is_floating_point():
        return F.cross_entropy(first.float(), first.detach().argmax(-1))
    raise ConfigError(f"{who}: needs a loss without labels, i.e. a 'logits' output over input_ids or class "
                      f"scores [batch, classes]; this graph outputs {', '.join(graph.output_names)} "
                      f"{tuple(first.shape)}")


def mean_loss(graph: Graph, calibration: Sequence[tuple], who: str, loss: Loss | None = None) -> float:
    """The mean over ``calibration`` of ``loss`` (default: ``calibration_loss``) without gradients."""
    fn = loss or (lambda g, sample, outputs: calibration_loss(g, sample, outputs, who))
    with torch.no_grad():
        return sum(float(fn(graph, s, graph.gm(*s))) for s in calibration) / len(calibration)


def interpolated(graph: Graph, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float) -> Graph:
    """A copy of ``graph`` whose float tensors in ``a`` are ``(1 − alpha)·a + alpha·b`` (exactly
    ``a`` at 0 and ``b`` at 1); ``b`` is keyed by ``graph``'s targets like ``a``."""
    out = graph.copy()
    for target, x in a.items():
        if x.is_floating_point():
            set_attr(out.gm, target, torch.lerp(x.detach(), b[target].detach().to(x.dtype), alpha))
    return out


def loss_path(graph: Graph, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], calibration: Sequence[tuple],
              weights: Sequence[float], who: str, loss: Loss | None = None) -> dict:
    """``mean_loss`` at each of ``weights`` along the line from weights ``a`` to ``b``
    (``interpolated``) and the path's ``barrier``: ``{"losses": [...], "barrier": x}``."""
    losses = [mean_loss(interpolated(graph, a, b, alpha), calibration, who, loss) for alpha in weights]
    return {"losses": losses, "barrier": barrier(weights, losses)}


def barrier(weights: Sequence[float], losses: Sequence[float]) -> float:
    """The path's barrier (module docstring); ``weights`` run from 0 to 1."""
    return max(loss - ((1 - alpha) * losses[0] + alpha * losses[-1]) for alpha, loss in zip(weights, losses))


def alphas(points: int) -> list[float]:
    """``points`` evenly spaced interpolation weights from 0 to 1 (at least the two endpoints)."""
    return [i / (points - 1) for i in range(points)]
