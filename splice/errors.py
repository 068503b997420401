"""User-facing errors: one line that names the pass, option, file or op at fault.

The CLI prints ``splice: error: <message>`` for these and exits non-zero without a
traceback (``--debug`` shows it). Library code raises them for bad *input*; bugs stay
ordinary exceptions.
"""


class SpliceError(Exception):
    """A bad input the user can fix; the message is a single line."""


class ConfigError(SpliceError, ValueError):
    """A pass option is unknown or out of range (``quantize.rtn: bits must be 2..8, got 9``)."""


class CaptureError(SpliceError):
    """torch.export could not capture the model."""


class ArtifactError(SpliceError):
    """An artifact directory is missing, edited or truncated."""


class OutputError(SpliceError):
    """An output path cannot be written: it exists, is a symlink, is read-only, or the disk is full."""


class ExportError(SpliceError):
    """Lowering to a runtime failed (e.g. an op without an ONNX translation)."""


class VerifyError(SpliceError):
    """A graph invariant does not hold after a pass."""


class SpliceWarning(UserWarning):
    """Something works but may not give what the user expects (too little calibration data); the
    CLI prints it as one line ``splice: warning: <message>``."""
