"""Shared fixtures: tiny zoo models saved as local HF directories (offline, once per session)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels are tested through Triton's CPU interpreter; it must be on before anything
# (torch included) imports triton. Set TRITON_INTERPRET=0 on a GPU machine to run them for real.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_configure(config):
    """Under pytest-xdist (CI runs ``-n 2`` on 2 cores) each worker gets one torch thread, so two
    workers do not fight over the cores with two threads each."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def zoo_hf_dir(tmp_path_factory):
    """Factory: ``zoo_hf_dir("llama")`` saves that tiny random zoo model with
    ``save_pretrained`` into a session tmp dir (once per name) and returns the directory.
    No tokenizer is saved."""
    made = {}

    def make(name: str = "llama"):
        if name not in made:
            from splice.eval import zoo

            path = tmp_path_factory.mktemp(f"hf-{name}")
            zoo.build(name).model.save_pretrained(path)
            made[name] = path
        return made[name]

    return make


@pytest.fixture(scope="session")
def llama_hf_dir(zoo_hf_dir):
    """The tiny zoo llama (hidden 64, 2 layers, tied embeddings) as an HF directory."""
    return zoo_hf_dir("llama")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    training the tiny zoo models is many small ops, dominated by thread hand-off on a loaded machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def byte_tokenizer(monkeypatch):
    """The tokenizer of every captured HF model is the byte tokenizer (vocab 256 = the zoo's;
    the tiny zoo directories carry none)."""
    from splice.eval.data import ByteTokenizer
    from splice.ir import tokenizer

    monkeypatch.setattr(tokenizer, "load_tokenizer", lambda path, gguf_file=None: ByteTokenizer())


@pytest.fixture
def no_capture(monkeypatch):
    """Fail the test if the CLI captures or loads a model (checks that fail fast)."""
    import splice

    def boom(*a, **k):
        pytest.fail("the model was captured before the bad input was reported")

    monkeypatch.setattr(splice, "capture", boom)
    monkeypatch.setattr(splice, "load", boom)


@pytest.fixture
def calib_text(tmp_path):
    """A calibration text file (``--calib``) of 5,000 characters: enough for the zoo llama's default
    calibration size (32 x 128 tokens)."""
    path = tmp_path / "calib.txt"
    path.write_text("splice calibration text. " * 200)
    return path
