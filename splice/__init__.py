"""splice: capture a model once, rewrite it with passes, export it to ONNX Runtime.

>>> g = splice.capture("path/to/hf_dir")
>>> q = g.apply("quantize.rtn:bits=4,group_size=32")
>>> q.save("out"); splice.export_onnx(q, "out.onnx")
"""
from splice.errors import SpliceError
from splice.frontends import capture, load
from splice.ir.graph import Graph
from splice.passes.base import PassConfig, PassContext, PassResult, list_passes, register_pass
from splice.passes.manager import Pipeline, run_pass
from splice.runtime.onnx import export_onnx, parity
from splice.adapters_api import (activate_adapter, adapter_parameters, deactivate_adapter, list_adapters,
                                 set_adapter_weight)
from splice.peft_io import load_peft, save_peft
from splice.train import train  # the function (import submodules as `from splice.train.hooks import ...`)

__version__ = "0.1.0"
__all__ = ["capture", "load", "Graph", "Pipeline", "run_pass", "export_onnx", "parity", "list_passes",
           "register_pass", "PassConfig", "PassContext", "PassResult", "SpliceError", "load_peft", "save_peft",
           "list_adapters", "set_adapter_weight", "activate_adapter", "deactivate_adapter", "adapter_parameters", "train"]
