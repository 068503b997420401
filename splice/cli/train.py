"""``splice train MODEL --data FILE -p SPEC … -o OUT``: train adapters and save an artifact.

The training options (``--steps``, ``--lr``, …) are generated from the fields of
:class:`splice.train.config.TrainConfig`: name, type, default, choices and help all come from
the dataclass, so a new training option is one field there.
"""
from __future__ import annotations

import dataclasses
import typing

from splice import progress
from splice.cli.ui import UI, UsageError, capture, check_output, esc, positive_int, require_exists

HELP = "train adapters on a data file and save an artifact"


def _add_config_options(p) -> None:
    """One ``--flag`` per TrainConfig field (``seq_len`` → ``--seq-len``)."""
    from splice.train.config import TrainConfig

    types = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind = positive_int if f.metadata.get("min") == 1 else types[f.name]
        metavar = None if "choices" in f.metadata else {int: "N", float: "X"}.get(types[f.name])
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=f.default,
                       choices=f.metadata.get("choices"), metavar=metavar,
                       help=f"{f.metadata['help']} (default {f.default})")


def add_parser(sub, common) -> None:
    p = sub.add_parser("train", parents=[common], help=HELP,
                       description="Capture MODEL (or load ARTIFACT), add adapters with -p, train the adapter "
                                   "tensors (or --trainable norms,biases|weights: recovery of a pruned model, "
                                   "pruned weights kept zero; everything else frozen) with AdamW on --data, and save the trained "
                                   "graph as an artifact OUT. Data: a text file (--loss causal_lm), JSONL "
                                   '{"anchor", "positive"} pairs (embedding) or {"text", "label"} lines '
                                   "(classification); see docs/training.md.",
                       epilog="example: splice train ./smollm2 --data train.txt --eval held.txt "
                              "-p adapter.lora:rank=8 --steps 200 --lr 1e-3 -o smollm2-lora")
    p.add_argument("model", metavar="MODEL|ARTIFACT")
    p.add_argument("--data", required=True, metavar="FILE", help="training data")
    p.add_argument("--eval", metavar="FILE", help="held-out data, evaluated before, every --eval-every steps and after")
    p.add_argument("-p", "--pass", dest="passes", action="append", metavar="SPEC",
                   help="a pass run before training, e.g. adapter.lora:rank=8 (repeatable)")
    _add_config_options(p)
    p.add_argument("--paser", metavar="MODEL|ARTIFACT",
                   help="recovery data by PASER: train on the --paser-budget windows of --data whose outputs moved "
                        "furthest from this (unpruned) model's, spread over content clusters")
    p.add_argument("--paser-budget", type=positive_int, default=64, metavar="N", help="windows PASER keeps (default 64)")
    p.add_argument("--paser-clusters", type=positive_int, default=8, metavar="K", help="content clusters (default 8)")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="write a checkpoint here (resumable with --resume)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="artifact directory to write")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.set_defaults(func=run)


def run(args, ui: UI) -> int:
    import splice
    from splice.eval.data import read_text
    from splice.passes.manager import Pipeline
    from splice.passes.spec import parse_spec
    from splice.train.config import TrainConfig

    # 1. everything that needs no model: options, pass specs, data files, output path
    opts = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    TrainConfig(**opts)
    if args.resume and not args.checkpoint_dir:
        raise UsageError("train: --resume needs --checkpoint-dir DIR")
    pipeline = Pipeline([parse_spec(spec) for spec in args.passes or []])
    for path in [args.data] + ([args.eval] if args.eval else []):
        read_text(path)
    out = check_output(args.output, args.force)
    require_exists(args.model)
    if args.paser:
        require_exists(args.paser)

    # 2. capture, add adapters, train, save
    graph, cap_s = capture(args.model, ui)
    ui.print(f"captured {esc(graph.source.get('name', args.model))}: {graph.num_params():,} params in {cap_s:.1f} s")
    if pipeline.steps:
        with ui.quiet():
            graph = pipeline.run(graph, progress=True).graph
        ui.print(f"passes: {esc(str(pipeline))}")
    select = None
    if args.paser:
        from splice.train.select import Paser

        reference, _ = capture(args.paser, ui)
        select = Paser(reference, args.paser_budget, args.paser_clusters)
    with ui.quiet(redirect=not progress.enabled()):
        trained, report = splice.train(graph, args.data, eval_data=args.eval, checkpoint_dir=args.checkpoint_dir,
                                       resume=args.resume, progress=progress.enabled(), select=select, **opts)
    with ui.phase(f"save {out}"):
        trained.save(out, force=args.force)

    # 3. summary
    if sel := report.get("selection"):
        ui.print(f"PASER: {sel['selected']:,} of {sel['candidates']:,} windows, mean degradation (JSD) "
                 f"{sel['degradation_selected']:.4f} vs {sel['degradation_mean']:.4f} over all")
    ui.print(f"trained {report['trainable_params']:,} parameters ({report['trainable_tensors']} tensors) for "
             f"{report['steps']} steps on {report['examples']:,} examples of {esc(args.data)} "
             f"({report['seconds_per_step']} s/step)")
    ui.print(f"train loss: {report['train_loss_first']:.4f} (first steps) → "
             f"{report['train_loss_last']:.4f} (last steps)")
    if report["eval_loss_after"] is not None:
        before = report["eval_loss_before"]
        ui.print(f"held-out loss ({esc(args.eval)}): "
                 + (f"{before:.4f} → " if before is not None else "") + f"{report['eval_loss_after']:.4f}")
    ui.print(f"saved artifact: {esc(out)}")
    return 0
