"""splice: capture a model once, rewrite it with passes, export it to ONNX Runtime.

>>> g = splice.capture("path/to/hf_dir")
>>> q = g.apply("quantize.rtn:bits=4,group_size=32")
>>> q.save("out"); splice.export_onnx(q, "out.onnx")

Every public name loads on first use (PEP 562), so ``import splice`` costs no torch import.
"""
import importlib

from splice.errors import SpliceError

__version__ = "0.1.0"

_HOME = {
    "capture": "splice.frontends", "load": "splice.frontends",
    "Graph": "splice.ir.graph",
    "PassConfig": "splice.passes.base", "PassContext": "splice.passes.base", "PassResult": "splice.passes.base",
    "list_passes": "splice.passes.base", "register_pass": "splice.passes.base",
    "Pipeline": "splice.passes.manager", "run_pass": "splice.passes.manager",
    "export_onnx": "splice.runtime.onnx", "parity": "splice.runtime.onnx",
    "activate_adapter": "splice.passes.adapters.api", "adapter_parameters": "splice.passes.adapters.api",
    "deactivate_adapter": "splice.passes.adapters.api", "list_adapters": "splice.passes.adapters.api",
    "set_adapter_weight": "splice.passes.adapters.api",
    "load_peft": "splice.passes.adapters.peft_io", "save_peft": "splice.passes.adapters.peft_io",
    "merge": "splice.passes.merge.api",
    "train": "splice.train.loop",  # the function (import submodules as `from splice.train.config import ...`)
}
__all__ = ["SpliceError", *_HOME]

# Load the (lazy, cheap) package now: importing it later would bind the name `train` here to it.
importlib.import_module("splice.train")
del globals()["train"]


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'splice' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    if name in ("capture", "load"):
        value = _with_passes(value)
    globals()[name] = value
    return value


def _with_passes(make):
    """``make`` (capture / load) for the API: its graphs get ``Graph.apply`` (the pass manager plugs
    itself in when imported), passes that read a model by path (``adapter.extract:source=DIR``)
    get the frontends' loader, and a loaded graph's pass versions are checked."""
    import functools

    from splice.frontends import capture
    from splice.passes.base import check_history
    from splice.passes.manager import set_graph_loader

    set_graph_loader(capture)

    @functools.wraps(make)
    def checked(*args, **kwargs):
        graph = make(*args, **kwargs)
        check_history(graph)
        return graph

    return checked


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
