"""``splice run MODEL -p SPEC … -o OUT``: run passes on a model and save an artifact.

Everything that needs no model (pass specs, recipe, PEFT directories, calibration file, OUT) is
checked before the model is captured; OUT is written only once every pass succeeded.
"""
from __future__ import annotations

from pathlib import Path

from splice import progress
from splice.cli.tables import history_table, plan_table
from splice.cli.ui import UI, UsageError, capture, check_output, esc, positive_int, require_exists, require_file
from splice.errors import ConfigError, SpliceError

HELP = "run passes on a model and save an artifact"


def add_parser(sub, common) -> None:
    p = sub.add_parser("run", parents=[common], help=HELP,
                       description="Capture MODEL, run the passes (recipe first, then each -p in order), and save "
                                   "the result as an artifact directory OUT. Specs, recipe, calibration file and "
                                   "OUT are all checked before the model is captured; OUT is only written if "
                                   "every pass succeeds.",
                       epilog="example: splice run ./llama -p quantize.rtn:bits=4,group_size=32 -o llama-int4")
    p.add_argument("model", metavar="MODEL", help="HF directory, .gguf, .pt2 or splice artifact")
    p.add_argument("-p", "--pass", dest="passes", action="append", metavar="SPEC",
                   help="a pass, 'name:key=value,...' (repeatable; see `splice passes NAME`)")
    p.add_argument("--recipe", metavar="FILE", help="YAML recipe with a 'passes' list")
    p.add_argument("--calib", action="append", metavar="SOURCE[:WEIGHT]",
                   help="calibration data for passes that need it (repeatable, mixed by weight): a UTF-8 text "
                        "file, a .jsonl file of {\"text\": ...} lines, a directory of those, or 'builtin' (a "
                        "general-domain mix of text this machine has: Python docs, licences, man pages)")
    p.add_argument("--calib-set", action="append", metavar="NAME=SOURCE[:WEIGHT]", default=[],
                   help="a further named calibration set for passes that read one (repeatable; sources as --calib), "
                        "e.g. --calib-set general=builtin for prune.dpruner")
    p.add_argument("--peft", action="append", metavar="DIR",
                   help="attach a PEFT adapter directory to the base before the passes (repeatable)")
    p.add_argument("--calib-samples", type=positive_int, default=None, metavar="N",
                   help="calibration samples (default: sized to the model, 32 tokens per input feature of its "
                        "widest layer, 16..512 samples)")
    p.add_argument("--calib-seqlen", type=positive_int, default=None, metavar="N",
                   help="tokens per calibration sample (default 512, or the model's positions if fewer)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="artifact directory to write")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--delta-only", action="store_true",
                   help="save the deltas without their base model's tensors (after delta.extract; loading finds "
                        "the base where delta.extract read it, its weights digest checked)")
    p.set_defaults(func=run)


def _pipeline(args):
    """The pipeline of --recipe then every -p, validated without a model."""
    from splice.passes.manager import Pipeline
    from splice.passes.spec import load_recipe, parse_spec

    steps = []
    if args.recipe:
        steps += load_recipe(require_file(args.recipe, "--recipe"))
    for spec in args.passes or []:
        steps.append(parse_spec(spec))
    if not steps and not args.peft:
        raise UsageError("run: no passes given; use -p PASS[:key=value,...] or --recipe FILE (see `splice passes`)")
    return Pipeline(steps)


def calibration_line(graph, calibration) -> str:
    """What the calibration is: samples, tokens, documents, sources, tokens per input feature."""
    from splice.ir.calibration import calibration_record

    r = calibration_record(graph, calibration)
    names = ", ".join(f"{s['name']} ({s['samples']})" for s in r["sources"] if s["samples"])
    per = (f"; {r['tokens_per_feature']:g} tokens per input feature of the widest layer "
           f"'{r['widest_layer']['path']}' ({r['widest_layer']['in_features']:,})" if "tokens_per_feature" in r else "")
    return esc(f"calibration: {r['samples']} samples × {r['seq_len']} tokens = {r['tokens']:,} tokens from "
               f"{r['documents']:,} documents of {names}{per}")


def _calibration_sets(specs: list[str], pipeline) -> dict[str, list]:
    """``--calib-set NAME=SOURCE`` values, sources read, by name; every set a pass reads must be given."""
    from splice.eval.corpus import load_sources

    raw: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep or not name or not source:
            raise UsageError(f"--calib-set {spec}: expected NAME=SOURCE, e.g. general=builtin")
        raw.setdefault(name, []).append(source)
    for info, _ in pipeline.steps:
        for name in info.datasets:
            if name not in raw:
                raise ConfigError(f"{info.name}: needs the calibration set '{name}' (--calib-set {name}=SOURCE)")
    return {name: load_sources(srcs) for name, srcs in raw.items()}


def run(args, ui: UI) -> int:
    # 1. everything that needs no model: pass specs, recipe, calibration file, output path
    pipeline = _pipeline(args)
    for peft_dir in args.peft or []:
        if not (Path(peft_dir) / "adapter_config.json").is_file():
            raise SpliceError(f"--peft {peft_dir}: not a PEFT adapter directory (no adapter_config.json)")
    needs = [info.name for info, cfg in pipeline.steps if info.calibrated(cfg)]
    if needs and not args.calib:
        raise ConfigError(f"{needs[0]}: needs calibration data; pass --calib FILE (or --calib builtin)")
    sources = None
    if args.calib:  # checked even when no pass needs it (the run would ignore it: say so early)
        from splice.eval.corpus import load_sources

        with ui.phase("read calibration sources"):
            sources = load_sources(args.calib)
    set_sources = _calibration_sets(args.calib_set, pipeline)
    out = check_output(args.output, args.force)
    require_exists(args.model)

    # 2. capture, calibrate, run, save
    graph, cap_s = capture(args.model, ui)
    ui.print(f"captured {esc(graph.source.get('name', args.model))}: {graph.num_params():,} params, "
             f"{len(graph.layers())} layers in {cap_s:.1f} s")
    for peft_dir in args.peft or []:
        import splice

        with ui.phase(f"load PEFT adapter {peft_dir}"):
            name = "default" if len(args.peft) == 1 else Path(peft_dir).resolve().name
            graph = splice.load_peft(graph, peft_dir, name=name)
        ui.print(f"attached PEFT adapter {esc(peft_dir)}")
    from splice.eval.calibration import calibration_data  # lazily: torch and the tokenizer stack

    calibration = None
    if needs:
        with ui.phase("tokenize calibration text"):
            calibration = calibration_data(graph, sources, args.calib_samples, args.calib_seqlen)
        ui.print(calibration_line(graph, calibration))
    elif args.calib:
        ui.print(f"note: --calib ignored, no pass in {esc(str(pipeline))} needs calibration")
    datasets = {}
    for name, srcs in set_sources.items():
        with ui.phase(f"tokenize calibration set {name}"):
            datasets[name] = calibration_data(graph, srcs, args.calib_samples, args.calib_seqlen)
    before = graph.nbytes()
    with ui.quiet(redirect=not progress.enabled()):  # each pass shows its own progress line
        result = pipeline.run(graph, calibration=calibration, progress=True, datasets=datasets)
    with ui.phase(f"save {out}"):
        result.graph.save(out, force=args.force, delta_only=args.delta_only)

    # 3. summary
    new = result.graph
    output = new.output_names[0] if new.output_names else None
    ui.print(history_table(result.reports, output, f"passes (fidelity of '{output}' vs the captured model)"))
    for entry in result.reports:  # mixed-precision passes report their per-layer plan
        if "plan" in (entry.get("report") or {}):
            ui.print(plan_table(entry))
    after = new.nbytes()
    ratio = f" ({before / after:.2f}× smaller)" if after and after < before else ""
    ui.print(f"model bytes: {before:,} → {after:,}{ratio}")
    ui.print(f"saved artifact: {esc(out)}")
    return 0
