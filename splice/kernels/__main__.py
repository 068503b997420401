"""``python -m splice.kernels``: print ``docs/backends.md`` (the op x backend table) from the registry."""
from splice.kernels import families  # noqa: F401  (registers every op)
from splice.kernels.registry import backends_markdown

print(backends_markdown(), end="")
