"""Silence library chatter (torch.export dumps, HF progress bars, warnings but splice's own) for clean CLI output."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

from splice.errors import SpliceWarning

LIBRARY_LOGGERS = ("torch", "onnxscript", "onnx_ir", "transformers")


@contextlib.contextmanager
def quiet(*, stderr: bool = True, stdout: bool = False):
    """Mute library loggers and warnings, and optionally whatever is printed to stderr/stdout."""
    loggers = [logging.getLogger(n) for n in LIBRARY_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        err = contextlib.redirect_stderr(io.StringIO()) if stderr else contextlib.nullcontext()
        out = contextlib.redirect_stdout(io.StringIO()) if stdout else contextlib.nullcontext()
        with warnings.catch_warnings(), err, out:
            warnings.simplefilter("ignore")
            warnings.simplefilter("default", SpliceWarning)  # ours are for the user (the CLI prints them)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
