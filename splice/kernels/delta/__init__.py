"""Weight-delta ops (``passes/delta``): a fine-tuned weight computed as its base weight plus a stored,
compressed delta (dense, ternary, sign stacks, low rank, quantized), and the stub a delta-only artifact
keeps in place of each base tensor."""
from splice.kernels.delta import ops  # noqa: F401
