"""Fixtures of the real-model tests: SmolLM2-135M-Instruct captured once per session for every
test file that uses it."""
from __future__ import annotations

import os

import pytest
from real_models import GGUF

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2():
    import splice

    return splice.capture(GGUF)
