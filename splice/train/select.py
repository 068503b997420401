"""Recovery-data selection for a pruned (or otherwise compressed) model: PASER.

PASER, "Post-Training Data Selection for Efficient Pruned Large Language Model Recovery"
(https://arxiv.org/abs/2502.12594): cluster the candidate examples by content, score each by how
much the compressed model's outputs moved away from the reference (uncompressed) model's — the
capability degradation score, the Jensen-Shannon divergence of their next-token distributions,
averaged over the example's tokens — give each cluster a share of the budget proportional to its
mean degradation, and fill each share with the cluster's most degraded examples (per token: the
paper's efficiency ordering). The recovery run then trains on the capabilities pruning hurt most
instead of a uniform sample.

Two simplifications, stated: examples are clustered by k-means (``scipy.cluster.vq.kmeans2``) over
a truncated SVD of their TF-IDF bag-of-tokens vectors (the paper embeds with Sentence-BERT and
clusters spectrally; no second model is needed here), and the paper's concept-consistency graph
(rejecting examples whose concepts conflict) is left out. For embedding models the degradation
score is one minus the cosine of the two models' mean-pooled embeddings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.train.data import Examples
from splice.train.loop import forward_batch

_SVD_RANK = 32


def _jsd(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence per position (nats) of two logit tensors [..., V]."""
    lp, lq = F.log_softmax(p_logits.float(), -1), F.log_softmax(q_logits.float(), -1)
    lm = torch.logsumexp(torch.stack([lp, lq]), 0) - math.log(2)
    return 0.5 * ((lp.exp() * (lp - lm)).sum(-1) + (lq.exp() * (lq - lm)).sum(-1))


def degradation(reference: Graph, model: Graph, examples: Examples, batch_size: int = 4) -> torch.Tensor:
    """Each example's capability degradation score: mean token JSD of the ``logits`` (1 − cosine of
    mean-pooled ``last_hidden_state`` for an embedding model) of ``model`` against ``reference``."""
    scores = []
    with torch.no_grad():
        for batch in examples.in_order(batch_size):
            ref, got = forward_batch(reference, batch), forward_batch(model, batch)
            mask = batch["attention_mask"].float()
            if "logits" in ref and ref["logits"].dim() == 3:
                per_token = _jsd(ref["logits"], got["logits"]) * mask
                scores.append(per_token.sum(1) / mask.sum(1))
            elif "logits" in ref:
                scores.append(_jsd(ref["logits"], got["logits"]))
            else:
                pool = (lambda h: (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
                a, b = pool(ref["last_hidden_state"]), pool(got["last_hidden_state"])
                scores.append(1 - F.cosine_similarity(a.float(), b.float(), dim=-1))
    return torch.cat(scores)


def token_clusters(examples: Examples, k: int, seed: int = 0) -> np.ndarray:
    """A cluster id per example: k-means over an SVD of TF-IDF bag-of-token vectors."""
    from scipy.cluster.vq import kmeans2
    from scipy.sparse import csr_matrix
    from scipy.sparse.linalg import svds

    rows, cols, vals = [], [], []
    for i, ex in enumerate(examples.rows):
        ids, counts = np.unique(np.concatenate([np.asarray(t) for t in ex]), return_counts=True)
        rows += [i] * len(ids)
        cols += ids.tolist()
        vals += counts.tolist()
    tf = csr_matrix((np.asarray(vals, float), (rows, cols)))
    df = np.bincount(tf.indices, minlength=tf.shape[1])
    tfidf = tf.multiply(np.log((1 + tf.shape[0]) / (1 + df)) + 1).tocsr()
    rank = min(_SVD_RANK, min(tfidf.shape) - 1)
    if rank < 1 or k < 2:
        return np.zeros(len(examples), int)
    u, s, _ = svds(tfidf, k=rank, random_state=seed)
    emb = u * s
    emb /= np.linalg.norm(emb, axis=1, keepdims=True) + 1e-12
    _, labels = kmeans2(emb, k, seed=seed, minit="++")
    return labels


def allocate(cluster_scores: list[float], sizes: list[int], budget: int) -> list[int]:
    """Examples per cluster: shares of ``budget`` proportional to each cluster's mean degradation
    (largest remainders), none over its size; what a full cluster cannot take goes to the others."""
    take = [0] * len(sizes)
    left = budget
    open_ = [i for i, n in enumerate(sizes) if n]
    while left > 0 and open_:
        total = sum(max(cluster_scores[i], 1e-12) for i in open_)
        quota = {i: left * max(cluster_scores[i], 1e-12) / total for i in open_}
        add = {i: min(int(quota[i]), sizes[i] - take[i]) for i in open_}
        for i in sorted(open_, key=lambda i: quota[i] - int(quota[i]), reverse=True)[:left - sum(add.values())]:
            if add[i] < sizes[i] - take[i]:
                add[i] += 1
        for i in open_:
            take[i] += add[i]
        left -= sum(add.values())
        open_ = [i for i in open_ if take[i] < sizes[i]]
        if not any(add.values()):
            break
    return take


@dataclass
class Paser:
    """A ``select`` for ``splice.train``: keep ``budget`` of the training examples, chosen by PASER
    against ``reference`` (the model before pruning)."""

    reference: Graph
    budget: int
    clusters: int = 8
    batch_size: int = 4

    def __post_init__(self):
        if self.budget < 1 or self.clusters < 1:
            raise ConfigError(f"paser: budget and clusters must be positive integers, got {self.budget}, {self.clusters}")

    def __call__(self, model: Graph, examples: Examples, seed: int = 0) -> tuple[Examples, dict]:
        if set(self.reference.output_names) != set(model.output_names):
            raise ConfigError("paser: the reference model's outputs "
                              f"({', '.join(self.reference.output_names)}) differ from the trained model's")
        scores = degradation(self.reference, model, examples, self.batch_size)
        labels = token_clusters(examples, min(self.clusters, len(examples)), seed)
        members = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]
        means = [float(scores[m].mean()) if len(m) else 0.0 for m in members]
        take = allocate(means, [len(m) for m in members], min(self.budget, len(examples)))
        lengths = torch.tensor([sum(len(t) for t in ex) for ex in examples.rows], dtype=torch.float)
        efficiency = scores / lengths
        chosen = sorted(int(i) for m, n in zip(members, take)
                        for i in m[np.argsort(-efficiency[m].numpy(), kind="stable")[:n]])
        subset = Examples(f"{examples.source} (PASER {len(chosen)} of {len(examples)})",
                          [examples.rows[i] for i in chosen],
                          None if examples.labels is None else [examples.labels[i] for i in chosen], examples.pad_id)
        report = {"method": "paser", "candidates": len(examples), "selected": len(chosen),
                  "degradation_mean": float(scores.mean()), "degradation_selected": float(scores[chosen].mean()),
                  "clusters": [{"size": len(m), "degradation": round(d, 6), "selected": n}
                               for m, d, n in zip(members, means, take)]}
        return subset, report
