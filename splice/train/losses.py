"""Training losses over a graph's named outputs.

* ``causal_lm``: next-token cross-entropy on ``logits`` [B, S, V] (position p predicts token
  p+1; padding is not scored), as ``transformers``' ``ForCausalLMLoss`` (fp32 logits, mean over tokens).
* ``masked_lm``: BERT's masked-token cross-entropy on ``logits`` [B, S, V] (the data masks 15 % of
  the tokens, ``ir/loss.py``'s ``mask_tokens``, and sets ``labels`` [B, S], -100 where not masked).
  A bare encoder scores its vocabulary through its tied word embeddings by outputting
  ``logits = last_hidden_state @ E^T`` (no new weights; capture such a wrapper, its head named ``lm_head``).
* ``embedding``: in-batch-negatives contrastive loss on mean-pooled ``last_hidden_state``
  (sentence-transformers' ``MultipleNegativesRankingLoss``: cosine similarities × 20, the
  positive of anchor i is the target of row i, every other positive a negative).
* ``classification``: cross-entropy of ``logits`` [B, C] against integer labels.

``check_graph(graph, loss)`` says, before any data is read, whether the graph has what the
loss needs (inputs ``input_ids``; the output named above).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from splice.errors import SpliceError
from splice.ir.loss import masked_lm_loss

_OUTPUT = {"causal_lm": "logits", "masked_lm": "logits", "embedding": "last_hidden_state", "classification": "logits"}
EMBEDDING_SCALE = 20.0  # sentence-transformers' MultipleNegativesRankingLoss default


def check_graph(graph, loss: str) -> None:
    name = graph.source.get("name") or "the model"
    if "input_ids" not in graph.input_names:
        raise SpliceError(f"train: loss={loss} needs a text model taking input_ids; {name} takes "
                          f"{', '.join(graph.input_names)}")
    if _OUTPUT[loss] not in graph.output_names:
        raise SpliceError(f"train: loss={loss} needs a '{_OUTPUT[loss]}' output; {name} has "
                          f"{', '.join(graph.output_names) or 'none'}")


def causal_lm(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = outputs["logits"][:, :-1].float()
    labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


class TiedLMHead(torch.nn.Module):
    """Vocabulary scores through the word embeddings ``E``: ``hidden @ E^T`` (no weights of its own)."""

    def __init__(self, embeddings: torch.nn.Embedding):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.embeddings.weight.T


class TiedMaskedLM(torch.nn.Module):
    """A bare encoder (``transformers``' ``BertModel`` and the like) as a masked LM for ``loss="masked_lm"``:
    ``forward(input_ids, attention_mask) -> {"logits": last_hidden_state @ E^T}``, the head named
    ``lm_head`` so adapters' default targets (``linear|!lm_head``) leave the shared embedding alone."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder
        self.lm_head = TiedLMHead(encoder.get_input_embeddings())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return {"logits": self.lm_head(hidden)}


def masked_lm(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return masked_lm_loss(outputs["logits"], batch["labels"])


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def embedding(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    emb = F.normalize(mean_pool(outputs["last_hidden_state"].float(), batch["attention_mask"]), dim=-1)
    anchors, positives = emb.chunk(2)
    scores = anchors @ positives.T * EMBEDDING_SCALE
    return F.cross_entropy(scores, torch.arange(len(anchors)))


def classification(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = outputs["logits"].float()
    if logits.dim() != 2:
        raise SpliceError(f"train: loss=classification needs logits [batch, classes], got shape {tuple(logits.shape)}")
    top = int(batch["labels"].max())
    if top >= logits.shape[1]:
        raise SpliceError(f"train: label {top} out of range for a model with {logits.shape[1]} classes")
    return F.cross_entropy(logits, batch["labels"])


LOSS_FNS = {"causal_lm": causal_lm, "masked_lm": masked_lm, "embedding": embedding, "classification": classification}
