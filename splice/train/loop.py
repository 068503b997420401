"""``splice.train``: train a graph's trainable tensors (adapters) with AdamW, returning a new Graph.

The captured graph *is* the training module: ``graph.gm`` runs forward and backward like any
``nn.Module``. Trainable are the tensors whose role (from the op registry, through
``Graph.param_roles``, so it survives save/load) is ``adapter`` or another role registered with
``register_trainable_role``, and any tensor a pass stored with ``trainable=True`` — or, with
``trainable="norms,biases"`` (PERP's recovery of a pruned model, https://arxiv.org/abs/2312.15230)
or ``weights``, the tensors of those roles; everything else is frozen (no gradient is computed for it). The input graph is never touched:
the trainable tensors are cloned into a training copy, and the returned graph holds the trained
clones next to the input's (shared, unchanged) base tensors, plus a ``train`` history entry.

The loop is Hugging Face ``Trainer``'s: AdamW (betas 0.9/0.999, eps 1e-8), linear or cosine
decay after ``warmup`` linear warm-up steps (``get_linear_schedule_with_warmup``'s formula) or a
constant rate, gradient accumulation over ``grad_accum`` micro-batches (each loss divided by
``grad_accum``), gradient-norm clipping at ``max_grad_norm``. Adapter dropout (an adapter option,
e.g. ``adapter.lora:dropout=0.1``, which the pass marks on its delta op in the IR) is applied to
the adapter's input in the training copy only (an ``aten.dropout`` node before the delta op), as PEFT does in train mode;
the base model's own dropout is not applied (the graph was captured in eval mode).

Hooks (``splice.ir.train_hooks``, registered by the passes that need them) add regularizers and act after backward / after each step.
Checkpoints (``splice.train.checkpoint``) make ``resume=True`` continue bit-for-bit where an
interrupted run stopped (same batches, RNG, optimizer and scheduler state); a hook's own state
is not checkpointed.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
from torch import fx

from splice.errors import ConfigError, SpliceError
from splice.eval.data import graph_inputs
from splice.ir.graph import Graph, set_attr
from splice.ir.sparsity import check_masks  # also registers the hook that keeps pruned weights zero
from splice.ir.tokenizer import graph_tokenizer
from splice.ir.train_hooks import TrainHook, input_dropouts, make_hooks
from splice.train import losses
from splice.train.checkpoint import load_checkpoint, save_checkpoint
from splice.train.config import TrainConfig
from splice.train.data import Examples, load_examples

TRAINABLE_ROLES = {"adapter"}
_SUMMARY_STEPS = 10  # first/last losses are averaged over this many steps


# ------------------------------------------------------------------- trainable tensors


def register_trainable_role(role: str) -> None:
    """Make tensors of ``role`` (an op argument role: ``ir.graph.arg_roles``, from the op registry) trainable."""
    TRAINABLE_ROLES.add(role)


_KIND_ROLES = {"norms": {"norm"}, "biases": {"bias"}, "weights": {"weight"}}


def trainable_targets(graph: Graph, kinds: Sequence[str] = ("adapters",)) -> list[str]:
    """Stored names of the tensors training updates: for ``adapters`` those of a trainable role or
    marked trainable (see the module docstring); ``norms``/``biases``/``weights`` add the float
    tensors of that role (dense layers' ``weight``: embeddings, linears, convs; masks keep their
    pruned entries zero)."""
    roles = graph.param_roles()
    wanted = set().union(*(_KIND_ROLES.get(k, ()) for k in kinds))
    adapters = "adapters" in kinds
    out = [t for t, v in graph.tensors().items() if v.is_floating_point() and (
        roles[t] in wanted or (adapters and (roles[t] in TRAINABLE_ROLES or getattr(v, "requires_grad", False))))]
    if not out:
        raise ConfigError(f"train: no trainable tensors of kind {', '.join(kinds)} (add an adapter first, "
                          "e.g. -p adapter.lora:rank=8, or choose --trainable norms,biases)")
    return out


def with_tensors(graph: Graph, params: dict[str, torch.nn.Parameter]) -> Graph:
    """A copy of ``graph`` reading ``params`` (by stored name) instead of its own tensors (marked
    trainable as each one's ``requires_grad`` says)."""
    out = graph.copy()
    for target, p in params.items():
        set_attr(out.gm, target, p, trainable=p.requires_grad)
    return out


def add_adapter_dropout(graph: Graph) -> int:
    """Put ``aten.dropout(x, p, train=True)`` on the first input of every node the IR marks for
    dropout (``ir/train_hooks.set_input_dropout``: an adapter's ``dropout`` option), in place, on
    the training copy only. Returns how many."""
    fxg: fx.Graph = graph.gm.graph
    marked = input_dropouts(graph)
    for node, p in marked:
        with fxg.inserting_before(node):
            dropped = fxg.call_function(torch.ops.aten.dropout.default, (node.args[0], p, True))
        node.update_arg(0, dropped)
    graph.gm.recompile()
    return len(marked)


# ------------------------------------------------------------------------------- loop


def forward_batch(graph: Graph, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The graph's named outputs on a tokenized batch."""
    return dict(zip(graph.output_names, graph.gm(*graph_inputs(graph, batch))))


def evaluate(graph: Graph, examples: Examples, loss: str, batch_size: int) -> float:
    """Mean loss over every example of ``examples`` (batches weighted by their size)."""
    fn = losses.LOSS_FNS[loss]
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in examples.in_order(batch_size):
            n = len(batch["input_ids"])
            total += float(fn(forward_batch(graph, batch), batch)) * n
            count += n
    return total / count


@dataclass
class _Run:
    """Everything one training run holds."""

    cfg: TrainConfig
    work: Graph  # the training copy (adapter dropout on)
    evaluator: Graph  # the same trainable tensors, no dropout
    params: dict[str, torch.nn.Parameter]
    data: Examples
    hooks: list[TrainHook]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR

    def backward(self, step: int) -> tuple[float, float]:
        """Forward and backward over the step's micro-batches: (task loss, regularizer), means."""
        cfg, fn = self.cfg, losses.LOSS_FNS[self.cfg.loss]
        task, reg_total = 0.0, 0.0
        for micro in range(cfg.grad_accum):
            batch = self.data.micro_batch(step * cfg.grad_accum + micro, cfg.batch_size, cfg.seed)
            loss = fn(forward_batch(self.work, batch), batch)
            regs = [r for r in (h.regularizer(step, cfg.steps) for h in self.hooks) if r is not None]
            reg = torch.stack([torch.as_tensor(r).float() for r in regs]).sum() if regs else None
            ((loss if reg is None else loss + reg) / cfg.grad_accum).backward()
            task += float(loss.detach()) / cfg.grad_accum
            reg_total += 0.0 if reg is None else float(reg.detach()) / cfg.grad_accum
        return task, reg_total

    def step(self, step: int) -> dict[str, float]:
        """One optimizer step (0-based ``step``); returns its history record."""
        cfg = self.cfg
        task, reg_total = self.backward(step)
        for h in self.hooks:
            h.after_backward(step, cfg.steps)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        for h in self.hooks:
            h.after_step(step, cfg.steps)
        record = {"step": step + 1, "loss": task, "lr": lr}
        if reg_total:
            record["regularizer"] = reg_total
        return record

    def state(self, step: int, history: list, evals: list) -> dict:
        return {"step": step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": torch.get_rng_state(), "history": history, "evals": evals}


def _prepare(graph: Graph, targets: list[str], examples: Examples, cfg: TrainConfig,
             extra_hooks: Sequence[TrainHook]) -> _Run:
    params = {t: torch.nn.Parameter(graph.tensor(t).detach().clone(), requires_grad=True) for t in targets}
    work = with_tensors(graph, params)
    add_adapter_dropout(work)
    evaluator = with_tensors(graph, params)
    optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.lr_factor)
    return _Run(cfg, work, evaluator, params, examples, make_hooks(work) + list(extra_hooks), optimizer, scheduler)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _report(run: _Run, history: list, evals: list, seconds: float, steps_run: int) -> dict:
    losses_ = [h["loss"] for h in history]
    n = min(_SUMMARY_STEPS, len(losses_))
    return {
        "loss": run.cfg.loss, "steps": run.cfg.steps, "examples": len(run.data),
        "trainable_tensors": len(run.params), "trainable_params": sum(p.numel() for p in run.params.values()),
        "train_loss_first": _mean(losses_[:n]), "train_loss_last": _mean(losses_[-n:]),
        "eval_loss_before": evals[0]["loss"] if evals and evals[0]["step"] == 0 else None,
        "eval_loss_after": evals[-1]["loss"] if evals else None,
        "evals": evals, "seconds": round(seconds, 3),
        "seconds_per_step": round(seconds / steps_run, 4) if steps_run else None,
        "history": history,
    }


def train(graph: Graph, data, *, loss: str = "causal_lm", steps: int = 100, lr: float = 2e-4, batch_size: int = 4,
          grad_accum: int = 1, seq_len: int = 256, warmup: int = 0, schedule: str = "linear",
          weight_decay: float = 0.0, max_grad_norm: float = 1.0, eval_data=None, eval_every: int = 0,
          checkpoint_dir=None, checkpoint_every: int = 50, resume: bool = False, seed: int = 0,
          progress: bool = True, tokenizer=None, hooks: Sequence[TrainHook] = (), trainable: str = "adapters",
          select: Callable[..., tuple[Examples, dict]] | None = None) -> tuple[Graph, dict]:
    """Train ``graph``'s adapters (or ``trainable``: see ``TrainConfig``) on ``data``; returns
    ``(trained graph, report)``.

    ``data``/``eval_data``: see ``splice.train.data`` (a text file or list of strings for
    ``causal_lm``; JSONL pairs / labelled texts for ``embedding`` / ``classification``).
    ``tokenizer`` defaults to the model's own. ``eval_data`` is evaluated before training, every
    ``eval_every`` steps and at the end. With ``checkpoint_dir`` a checkpoint is written every
    ``checkpoint_every`` steps and at the end; ``resume=True`` continues from it. ``hooks`` are
    added to those the registered factories make. ``select(graph, examples, seed) -> (examples,
    report)`` picks the training examples first (``splice.train.select.Paser``: recovery data for a
    pruned model). The report has the per-step ``history`` (loss, lr), ``evals``, summary losses
    and the selection's report. Pruned weights stay zero (``ir/sparsity``'s train hook); the
    trained graph's masks are checked before it is returned.
    """
    cfg = TrainConfig(loss=loss, steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                      seq_len=seq_len, warmup=warmup, schedule=schedule, weight_decay=weight_decay,
                      max_grad_norm=max_grad_norm, eval_every=eval_every, checkpoint_every=checkpoint_every,
                      seed=seed, trainable=trainable)
    if resume and checkpoint_dir is None:
        raise ConfigError("train: resume needs checkpoint_dir (--checkpoint-dir)")
    targets = trainable_targets(graph, cfg.trainable_kinds())  # fail on a graph without adapters before loading any tokenizer
    losses.check_graph(graph, cfg.loss)
    tokenizer = tokenizer if tokenizer is not None else graph_tokenizer(graph, "train")
    examples = load_examples(data, cfg.loss, tokenizer, cfg.seq_len)
    selection = None
    if select is not None:
        examples, selection = select(graph, examples, cfg.seed)
    run = _prepare(graph, targets, examples, cfg, hooks)
    held_out = None if eval_data is None else load_examples(eval_data, cfg.loss, tokenizer, cfg.seq_len)
    fingerprint = {**cfg.run_fingerprint(), "data": run.data.digest(),
                   "trainable": {t: list(p.shape) for t, p in run.params.items()}}
    start, history, evals = 0, [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if resume:
            state = load_checkpoint(checkpoint_dir, run.params, fingerprint)
            run.optimizer.load_state_dict(state["optimizer"])
            run.scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            start, history, evals = state["step"], list(state["history"]), list(state["evals"])
        began = time.perf_counter()
        if held_out is not None and start == 0:
            evals.append({"step": 0, "loss": evaluate(run.evaluator, held_out, cfg.loss, cfg.batch_size)})
        history, evals = _loop(run, start, history, evals, held_out, checkpoint_dir, progress, fingerprint)
        seconds = time.perf_counter() - began
    report = _report(run, history, evals, seconds, cfg.steps - start)
    if selection is not None:
        report["selection"] = selection
    trained = _trained_graph(graph, run, report)
    if problems := check_masks(trained):
        raise SpliceError(f"train: revived pruned weights: {problems[0]}")
    return trained, report


def _loop(run: _Run, start: int, history: list, evals: list, held_out: Examples | None, checkpoint_dir,
          progress: bool, fingerprint: dict) -> tuple[list, list]:
    from tqdm import tqdm

    cfg = run.cfg
    with tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not progress) as bar:
        for step in range(start, cfg.steps):
            record = run.step(step)
            if not math.isfinite(record["loss"]):
                raise SpliceError(f"train: loss is {record['loss']} at step {step + 1}; lower lr (now {cfg.lr:g})")
            history.append(record)
            done = step + 1
            last = done == cfg.steps
            if held_out is not None and (last or (cfg.eval_every and done % cfg.eval_every == 0)):
                evals.append({"step": done, "loss": evaluate(run.evaluator, held_out, cfg.loss, cfg.batch_size)})
            if checkpoint_dir is not None and (last or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)):
                save_checkpoint(checkpoint_dir, run.params, run.state(done, history, evals), fingerprint)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            **({"eval": f"{evals[-1]['loss']:.4f}"} if evals else {}))
            bar.update(1)
    return history, evals


def _trained_graph(graph: Graph, run: _Run, report: dict) -> Graph:
    # each tensor keeps the trainability it came with: weights trained with trainable=weights stay
    # frozen for a later run that trains adapters only
    trained = {t: torch.nn.Parameter(p.detach().clone(), requires_grad=bool(getattr(graph.tensor(t), "requires_grad", False)))
               for t, p in run.params.items()}
    out = with_tensors(graph, trained)
    if run.data.masking is not None:  # its calibration loss (ir/loss.py) is then the objective it was trained with
        out.source["masked_lm"] = run.data.masking
    summary = {k: v for k, v in report.items() if k != "history"}
    spec = ",".join(f"{k}={v}" for k, v in asdict(run.cfg).items() if getattr(TrainConfig(), k) != v)
    out.history = out.history + [{"pass": "train", "spec": "train" + (":" + spec if spec else ""),
                                  "config": {**asdict(run.cfg), "data": run.data.source},
                                  "version": 1, "seconds": report["seconds"], "report": summary}]
    return out
