"""``adapter.adalora``: SVD-form adapter ``P Λ Q`` whose rank budget moves to the important layers.

AdaLoRA (https://arxiv.org/abs/2303.10512), as PEFT 0.21's ``SVDLinear`` / ``RankAllocator``:
``ΔW = B (A ⊙ E) · scale / ranknum`` with PEFT's tensors ``lora_A [r, in]`` (Q), ``lora_E [r, 1]`` (Λ),
``lora_B [out, r]`` (P), ``scale = alpha`` (× the adapter's weight) and the 0-d ``ranknum`` = PEFT's
``ranknum + 1e-5``, ``ranknum = init_r`` (PEFT keeps it at ``init_r`` even after pruning); multiplied
then divided, in PEFT's order. Init (PEFT ``init_lora_weights=True``): E = 0, A and B ~ N(0, 0.02),
so outputs start unchanged; ``init=random`` draws all three from N(0, 1) (PEFT ``False``).

Training (``splice.train`` hook ``AdaLoraHook``, registered below):

* ``regularizer``: ``orth_reg_weight · mean(‖AAᵀ − I‖_F, ‖BᵀB − I‖_F over every A and B)`` (PEFT's
  ``AdaLoraModel.forward``);
* sensitivity ``I = |p ⊙ ∇p|`` per entry of A, E, B, smoothed ``Ī ← β1 Ī + (1−β1) I`` and
  ``Ū ← β2 Ū + (1−β2)|I − Ī|``, score ``Ī·Ū``; triplet ``i``'s importance is ``s(E_i) + mean_j s(A_ij) +
  mean_j s(B_ji)``;
* budget: ``init_r · layers`` until ``tinit``, then cubic down to ``target_r · layers`` at
  ``total_step − tfinal``; every ``delta_t`` steps the lowest-importance triplets get ``E_i = 0``; at
  ``total_step − tfinal`` the final mask is fixed and re-applied after every later step. The kept
  triplets per layer are recorded as ``rank_pattern`` (PEFT's) in the adapter's metadata.

PEFT calls ``update_and_allocate(step)`` after ``optimizer.step()``; the hook does the same work in
``after_step``, with the gradients it kept in ``after_backward`` (``I`` uses the updated weights).
``total_step = 0`` takes the training run's total. ``init_r`` is at most ``min(in, out)`` of every layer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from splice.errors import ConfigError
from splice.ir.graph import Graph
from splice.ir.train_hooks import TrainHook, register_train_hook
from splice.passes.adapters._common import (
    ADAPTER_REPORT,
    AdapterConfig,
    Method,
    Site,
    attach,
    check_rank,
    check_rank_dropout,
    read_meta,
    register_method,
    sites,
    write_meta,
)
from splice.passes.adapters._inject import Layer, inject
from splice.passes.adapters._peft import PeftLoad, base_config, register_peft_format
from splice.passes.adapters.lora_peft import refuse_options
from splice.passes.base import PassContext, PassResult, register_pass


@dataclass(frozen=True, kw_only=True)
class AdaLoraConfig(AdapterConfig):
    """AdaLoRA adapter (PEFT-compatible): SVD-form LoRA with an importance-driven rank budget."""

    init_r: int = field(default=8, metadata={"help": "initial rank of every layer (PEFT's default 12)"})
    target_r: int = field(default=4, metadata={"help": "average rank per layer at the end of the budget schedule"})
    alpha: float = field(default=8.0, metadata={"help": "scale = alpha / init_r (PEFT's lora_alpha)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input, training only"})
    init: Literal["default", "random"] = field(default="default", metadata={
        "help": "default: E = 0, A, B ~ N(0, 0.02); random: all N(0, 1)"})
    tinit: int = field(default=0, metadata={"help": "steps at the full budget before pruning starts"})
    tfinal: int = field(default=0, metadata={"help": "last steps with the final (fixed) rank pattern"})
    delta_t: int = field(default=1, metadata={"help": "steps between two budget allocations (PEFT's deltaT)"})
    beta1: float = field(default=0.85, metadata={"help": "EMA factor of the sensitivity"})
    beta2: float = field(default=0.85, metadata={"help": "EMA factor of the uncertainty"})
    orth_reg_weight: float = field(default=0.5, metadata={"help": "weight of the orthogonality regularizer"})
    total_step: int = field(default=0, metadata={"help": "steps of the schedule; 0 = the training run's total"})

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.target_r <= self.init_r:
            raise ValueError(f"need 1 <= target_r <= init_r, got target_r={self.target_r}, init_r={self.init_r}")
        check_rank_dropout(self.init_r, self.dropout)
        if self.delta_t < 1:
            raise ValueError(f"delta_t must be >= 1, got {self.delta_t}")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if min(self.tinit, self.tfinal, self.total_step) < 0:
            raise ValueError("tinit, tfinal and total_step must be >= 0")
        if self.total_step:
            check_schedule(self.tinit, self.tfinal, self.total_step)


def check_schedule(tinit: int, tfinal: int, total: int) -> None:
    if tinit >= total - tfinal:
        raise ValueError(f"tinit={tinit} and tfinal={tfinal} leave no budgeting phase in total_step={total} "
                         "(decrease tinit/tfinal or train longer)")


def ranknum(init_r: int) -> torch.Tensor:
    """PEFT's ``ranknum + 1e-5``: a float32 tensor holding ``init_r``, plus 1e-5."""
    return torch.tensor(float(init_r)) + 1e-5


def _delta_weight(t: dict[str, torch.Tensor]) -> torch.Tensor:
    a, e, b, scale, rank = (t[k].detach().float() for k in ADALORA.keys)
    return b @ (a * e) * scale / rank


SCHEDULE = ("target_r", "tinit", "tfinal", "delta_t", "beta1", "beta2", "orth_reg_weight", "total_step")
ADALORA = register_method(Method("adalora", torch.ops.splice.adalora_delta.default, ("A", "E", "B", "scale", "ranknum"),
                                 ("A", "E", "B"), _delta_weight))


@register_pass("adapter.adalora", AdaLoraConfig, reference="https://arxiv.org/abs/2303.10512", provides=("adapter",),
               report_fields=ADAPTER_REPORT)
def adalora(graph: Graph, cfg: AdaLoraConfig, ctx: PassContext) -> PassResult:
    who, r = "adapter.adalora", cfg.init_r
    gen = ctx.generator()

    def make(layer: Layer) -> dict:
        check_rank(who, r, layer.path, layer.out_f, layer.in_f)
        std = 1.0 if cfg.init == "random" else 0.02
        a = torch.randn(r, layer.in_f, generator=gen) * std
        b = torch.randn(layer.out_f, r, generator=gen) * std
        e = torch.randn(r, 1, generator=gen) if cfg.init == "random" else torch.zeros(r, 1)
        return {"A": a, "E": e, "B": b, "ranknum": ranknum(r)}

    schedule = {k: getattr(cfg, k) for k in SCHEDULE}
    meta = {"rank": r, "init_r": r, "alpha": cfg.alpha, "dropout": cfg.dropout, "init": cfg.init,
            "scaling": cfg.alpha, **schedule}
    return inject(graph, cfg, who, ADALORA, ("linear",), make, meta)


# ------------------------------------------------------------------- training: rank allocation


class RankAllocator:
    """PEFT's ``RankAllocator`` for one adapter name over its layers (``sites`` of one module each)."""

    def __init__(self, graph: Graph, layers: list[Site]):
        self.layers = layers
        self.params = [{k: graph.tensor(n.target) for k, n in s.nodes().items() if k in ADALORA.trainable} for s in layers]
        self.cfg = layers[0].meta
        self.init_bgt = sum(p["A"].shape[0] for p in self.params)
        self.target_bgt = self.cfg["target_r"] * len(layers)
        self.grads: list[dict[str, torch.Tensor]] = []
        self.reset_ipt()
        self.pattern: list[torch.Tensor] | None = None

    def reset_ipt(self) -> None:
        self.avg_ipt = [{k: torch.zeros_like(p) for k, p in ps.items()} for ps in self.params]
        self.avg_unc = [{k: torch.zeros_like(p) for k, p in ps.items()} for ps in self.params]

    def total(self, run_total: int) -> int:
        total = self.cfg["total_step"] or run_total
        try:
            check_schedule(self.cfg["tinit"], self.cfg["tfinal"], total)
        except ValueError as e:
            raise ConfigError(f"adapter.adalora: {e}") from None
        return total

    def budget(self, step: int, total: int) -> tuple[int, bool]:
        tinit, tfinal = self.cfg["tinit"], self.cfg["tfinal"]
        if step <= tinit:
            return self.init_bgt, False
        if step > total - tfinal:
            return self.target_bgt, True
        cubic = (1 - (step - tinit) / (total - tfinal - tinit)) ** 3
        return int((self.init_bgt - self.target_bgt) * cubic + self.target_bgt), step % self.cfg["delta_t"] == 0

    def keep_grads(self) -> None:
        self.grads = [{k: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for k, p in ps.items()}
                      for ps in self.params]

    def update_ipt(self) -> None:
        b1, b2 = self.cfg["beta1"], self.cfg["beta2"]
        for ps, grads, avg, unc in zip(self.params, self.grads, self.avg_ipt, self.avg_unc):
            for k, p in ps.items():
                ipt = (p.detach() * grads[k]).abs()
                avg[k] = b1 * avg[k] + (1 - b1) * ipt
                unc[k] = b2 * unc[k] + (1 - b2) * (ipt - avg[k]).abs()

    def triplet_scores(self) -> list[torch.Tensor]:
        out = []
        for avg, unc in zip(self.avg_ipt, self.avg_unc):
            s = {k: avg[k] * unc[k] for k in avg}
            out.append(s["E"].view(-1) + (s["A"].mean(dim=1) + s["B"].mean(dim=0)))
        return out

    def mask_to_budget(self, budget: int) -> None:
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        threshold = torch.kthvalue(torch.cat(scores), k).values.item() if k > 0 else -float("inf")
        self.pattern = [s > threshold for s in scores]
        self.apply_pattern()

    def apply_pattern(self) -> None:
        with torch.no_grad():
            for ps, keep, site in zip(self.params, self.pattern, self.layers):
                ps["E"].masked_fill_(~keep.view(-1, 1), 0.0)
                write_meta(site.delta, {**read_meta(site.delta), "rank_pattern": keep.tolist()})

    def update_and_allocate(self, step: int, run_total: int) -> None:
        """PEFT's ``AdaLoraModel.update_and_allocate(step)``."""
        total = self.total(run_total)
        final = total - self.cfg["tfinal"]
        if step < final:
            self.update_ipt()
            budget, mask = self.budget(step, total)
            if mask:
                self.mask_to_budget(budget)
        elif step == final:
            self.mask_to_budget(self.budget(step, total)[0])
            self.reset_ipt()
        elif self.pattern is not None:
            self.apply_pattern()

    def orthogonality(self) -> torch.Tensor:
        terms = []
        for ps in self.params:
            for gram in (ps["A"] @ ps["A"].T, ps["B"].T @ ps["B"]):
                terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0]), "fro"))
        return self.cfg["orth_reg_weight"] * torch.stack(terms).mean()


class AdaLoraHook(TrainHook):
    """AdaLoRA's regularizer and rank allocation, one ``RankAllocator`` per AdaLoRA adapter name."""

    def __init__(self, allocators: list[RankAllocator]):
        self.allocators = allocators

    def regularizer(self, step: int, total: int) -> torch.Tensor:
        return sum(a.orthogonality() for a in self.allocators)

    def after_backward(self, step: int, total: int) -> None:
        for a in self.allocators:
            a.keep_grads()

    def after_step(self, step: int, total: int) -> None:
        for a in self.allocators:
            a.update_and_allocate(step, total)


@register_train_hook
def adalora_hook(graph: Graph) -> AdaLoraHook | None:
    by_name: dict[str, dict[str, Site]] = {}
    for s in sites(graph):
        if s.method is ADALORA:
            by_name.setdefault(s.name, {}).setdefault(s.path, s)  # a module called twice: one layer
    if not by_name:
        return None
    return AdaLoraHook([RankAllocator(graph, list(layers.values())) for layers in by_name.values()])


# ------------------------------------------------------------------------ PEFT mapping
# ``<path>.lora_A`` [r, in], ``.lora_E`` [r, 1], ``.lora_B`` [out, r] (no ``.weight``); with
# ``rank_pattern`` ({"<path>.lora_E": [kept…]}) the tensors hold the kept triplets only.
ADALORA_KEY = re.compile(r"(?P<path>.+)\.(?P<key>lora_[AEB])")
_PEFT_SCHEDULE = {"delta_t": "deltaT"}  # splice option -> PEFT option where the names differ


def load_adalora(job: PeftLoad) -> None:
    refuse_options(job)
    cfg = job.config
    init_r = int(cfg.get("init_r", 12))
    alpha = float(cfg.get("lora_alpha", 8)) if float(cfg.get("lora_alpha", 8)) > 0 else float(init_r)
    patterns = cfg.get("rank_pattern") or {}
    schedule = {k: cfg.get(_PEFT_SCHEDULE.get(k, k)) or 0 for k in SCHEDULE}
    for mod, parts in job.modules(ADALORA_KEY, "AdaLoRA lora_A/E/B").items():
        for k in ("lora_A", "lora_E", "lora_B"):
            if k not in parts:
                raise job.error(f"'{mod}' has {k} missing")
        (ka, a), (ke, e), (kb, b) = parts["lora_A"], parts["lora_E"], parts["lora_B"]
        first, *again = job.layers(mod, ka)
        out_f, in_f = job.shape(first)
        lp = job.claim(first)
        pattern = patterns.get(f"{mod}.lora_E")
        r = sum(pattern) if pattern else init_r
        for key, value, want in ((ka, a, (r, in_f)), (ke, e, (r, 1)), (kb, b, (out_f, r))):
            if tuple(value.shape) != want:
                raise ConfigError(f"adapter.peft: {key} has shape {list(value.shape)}, expected {list(want)} for '{lp}'")
        meta = {"rank": r, "init_r": init_r, "alpha": alpha, "dropout": float(cfg.get("lora_dropout") or 0.0),
                "init": "peft", "scaling": alpha, "weight": 1.0, "active": True,
                "source": str(job.path), **schedule, **({"rank_pattern": pattern} if pattern else {})}
        tensors = {"A": a.float().contiguous(), "E": e.float().contiguous(), "B": b.float().contiguous(),
                   "scale": torch.tensor(alpha, dtype=torch.float32), "ranknum": ranknum(init_r)}
        for node in (first, *again):
            tensors = attach(job.graph, node, job.name, ADALORA, tensors, meta)


def _kept(site: Site, t: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[bool] | None]:
    """The tensors PEFT stores (pruned to the kept triplets) and the layer's rank pattern."""
    pattern = site.meta.get("rank_pattern")
    if pattern and len(pattern) == t["A"].shape[0] and not all(pattern):
        keep = torch.tensor(pattern)
        return {"A": t["A"][keep], "E": t["E"][keep], "B": t["B"][:, keep]}, pattern
    return t, pattern if pattern and sum(pattern) == t["A"].shape[0] and not all(pattern) else None


def save_adalora(graph: Graph, chosen: list[Site]) -> tuple[dict, dict]:
    """``lora_alpha`` carries the adapter's weight; masked triplets are pruned as PEFT saves them."""
    metas = [s.meta for s in chosen]
    if len({(m["init_r"], m["alpha"] * m.get("weight", 1.0)) for m in metas}) > 1:
        raise ConfigError(f"save_peft: AdaLoRA adapter '{chosen[0].name}' has layers with different init_r or alpha; "
                          "PEFT's AdaLoraConfig has one of each")
    weights, patterns = {}, {}
    for s in chosen:
        t, pattern = _kept(s, s.tensors(graph))
        for k in ("A", "E", "B"):
            weights[f"base_model.model.{s.path}.lora_{k}"] = t[k].detach().contiguous()
        if pattern:
            patterns[f"{s.path}.lora_E"] = list(pattern)
    m = metas[0]
    schedule = {_PEFT_SCHEDULE.get(k, k): m[k] for k in SCHEDULE}
    schedule["total_step"] = max(m["total_step"], m["tinit"] + m["tfinal"] + 1)  # PEFT needs a valid schedule
    config = {**base_config("ADALORA", graph, [s.path for s in chosen]), **schedule, "init_r": m["init_r"],
              "lora_alpha": m["alpha"] * m.get("weight", 1.0), "lora_dropout": m.get("dropout", 0.0), "bias": "none",
              "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
              "rank_pattern": patterns or None}
    return config, weights


register_peft_format("ADALORA", load=load_adalora, save=save_adalora, methods=("adalora",))
