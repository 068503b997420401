"""``splice merge RECIPE.yaml -o OUT [--hf DIR]``: run a mergekit YAML recipe; save the merged model as
an artifact (its history records the recipe and every input's weight digest) and, with ``--hf``,
as a transformers directory (safetensors + config, as mergekit writes it; the tokenizer of
``tokenizer_source`` — ``union`` builds one, ``passes/merge/vocab.py`` — else of the base or first
model, saved beside it). The recipe is checked
before any model loads; nothing is written unless the merge succeeded."""
from __future__ import annotations

from pathlib import Path

from splice.cli.ui import UI, check_output, esc

HELP = "merge models by a mergekit YAML recipe"


def add_parser(sub, common) -> None:
    p = sub.add_parser("merge", parents=[common], help=HELP,
                       description="Merge the models of RECIPE (mergekit's YAML: merge_method, base_model, models "
                                   "with parameters, top-level parameters, dtype, out_dtype, tokenizer_source).")
    p.add_argument("recipe", metavar="RECIPE.yaml")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="artifact directory to write")
    p.add_argument("--hf", metavar="DIR", help="also write a transformers directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the random methods (DARE, DELLA)")
    p.add_argument("--calib", action="append", metavar="SOURCE[:WEIGHT]",
                   help="calibration data of the data-aware methods (fisher, regmean), run through every model; "
                        "sources as splice run's --calib")
    p.add_argument("--force", action="store_true", help="overwrite OUT (and DIR) if they exist")
    p.set_defaults(func=run)


def _write_tokenizer(graph, out: Path) -> None:
    """The merged graph's tokenizer into ``out``: its directory's files as they are (none where the
    model directory holds none), or saved from a GGUF file."""
    import shutil

    from splice.ir.tokenizer import graph_tokenizer, tokenizer_files

    spec = graph.source.get("tokenizer") or {}
    if spec.get("gguf_file"):
        graph_tokenizer(graph, "--hf").save_pretrained(out)
    elif spec.get("path"):
        for name, path in tokenizer_files(spec["path"]).items():
            shutil.copy2(path, out / name)


def _calibrate(sources):
    """``calibrate(graph, source)`` for ``merge_recipe``: a model's own ``calibration`` source, or
    (``source=None``) the ``--calib`` sources (None without them), tokenized for ``graph``."""
    from splice.eval.calibration import calibration_data
    from splice.eval.corpus import load_sources

    def calibrate(graph, source):
        chosen = load_sources([source]) if source else sources
        return calibration_data(graph, chosen, None, None) if chosen is not None else None

    return calibrate


def run(args, ui: UI) -> int:
    from splice.errors import SpliceError
    from splice.ir.atomic import atomic_dir
    from splice.passes.merge.api import merge_recipe
    from splice.passes.merge.recipe import read_recipe

    from splice.passes.base import get_pass

    recipe = read_recipe(args.recipe)
    info = get_pass(f"merge.{recipe.method}")
    own = [src for i, src in enumerate(recipe.model_calibration) if i != recipe.base]
    if info.calibrated(info.config_cls()) and not args.calib and not (own and all(own)):
        raise SpliceError(f"merge.{recipe.method}: needs calibration data; pass --calib FILE (or --calib builtin), "
                          "or give every model its own (calibration: FILE in its models entry)")
    sources = None
    if args.calib:
        from splice.eval.corpus import load_sources

        sources = load_sources(args.calib)
    out = check_output(args.output, args.force)
    hf = check_output(args.hf, args.force) if args.hf else None
    from splice.frontends import capture
    from splice.passes.manager import set_graph_loader

    set_graph_loader(capture)  # the recipe's model paths load as `splice run`'s MODEL does
    with ui.phase(f"merge {len(recipe.inputs)} models ({recipe.method})"):
        graph = merge_recipe(recipe, seed=args.seed, calibrate=_calibrate(sources))
    if hf is not None:
        from splice.runtime.hf import export_hf

        def write_hf(tmp: Path) -> None:
            export_hf(graph, tmp)
            _write_tokenizer(graph, tmp)

        with ui.phase(f"write {hf} (transformers)"):
            atomic_dir(hf, args.force, write_hf)
    with ui.phase(f"save {out}"):
        graph.save(out, force=args.force)
    report = graph.history[-1]["report"]
    what = (f"merged {report['tensors_merged']} tensors" + (f" into {report['layers']} layers" if "layers" in report else "")
            + f" ({report['tensors_kept']} buffers equal in every input kept)")
    ui.print(f"{what}; saved artifact: {esc(out)}" + (f"; transformers directory: {esc(hf)}" if hf else ""))
    return 0
