"""Progress on stderr: `splice.progress` phases and bars, shown on a terminal, silenced by --quiet.

The CLI runs on a pseudo-terminal as stderr, as a user would see it; on a pipe (and in-process
under pytest) nothing is shown, so error output stays one line.
"""
import io
import os
import pty
import re
import subprocess
import sys
import threading

import pytest
from zoo_graphs import run_cli

from splice import progress


@pytest.fixture
def stream():
    buf = io.StringIO()
    progress.configure(enabled=True, stream=buf)
    yield buf
    progress.configure()


def test_phase_prints_start_and_duration(stream):
    with progress.phase("capture model"):
        pass
    assert re.fullmatch(r"capture model …\ncapture model: \d+\.\d s\n", stream.getvalue()), stream.getvalue()


def test_failed_phase_leaves_only_its_start(stream):
    with pytest.raises(ValueError), progress.phase("export"):
        raise ValueError("boom")
    assert stream.getvalue() == "export …\n"


def test_track_shows_a_bar_and_yields_everything(stream):
    assert list(progress.track(range(5), "blocks", unit="block")) == [0, 1, 2, 3, 4]
    assert "blocks" in stream.getvalue() and "5/5" in stream.getvalue()


def test_silenced(stream):
    progress.configure(enabled=False, stream=stream)
    with progress.phase("x"):
        assert list(progress.track([1, 2], "y")) == [1, 2]
    progress.configure(enabled=True, stream=stream)
    with progress.phase("z", show=False):
        assert list(progress.track([3], "w", show=False)) == [3]
    assert stream.getvalue() == ""


def test_off_on_a_pipe():
    progress.configure(stream=io.StringIO())  # not a terminal
    assert not progress.enabled()
    progress.configure()


def test_elapsed():
    assert progress.elapsed(4.24) == "4.2 s" and progress.elapsed(187) == "3 min 07 s"


def on_a_terminal(argv) -> tuple[int, str, str]:
    """Run ``python -m splice ARGV`` with stderr on a pseudo-terminal: (exit code, stdout, stderr)."""
    master, slave = pty.openpty()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    proc = subprocess.Popen([sys.executable, "-m", "splice", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=slave, env=env, text=True)
    os.close(slave)
    chunks = []

    def drain():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    out, _ = proc.communicate(timeout=600)
    reader.join(timeout=60)
    os.close(master)
    return proc.returncode, out, b"".join(chunks).decode(errors="replace")


def test_cli_status_lines_on_a_terminal_and_quiet(llama_hf_dir):
    rc, out, err = on_a_terminal(["inspect", llama_hf_dir])
    assert rc == 0 and "params:" in out, err
    final = [line.rsplit("\r", 1)[-1].replace("\x1b[K", "") for line in err.splitlines()]
    assert any(re.fullmatch(rf"capture {re.escape(str(llama_hf_dir))}: \d+\.\d s", line) for line in final), err
    assert any(re.fullmatch(r"torch\.export \S+: \d+\.\d s", line) for line in final), err
    rc, out, err = on_a_terminal(["--quiet", "inspect", llama_hf_dir])
    assert rc == 0 and "params:" in out
    assert err == "", err


def test_nothing_on_stderr_in_process(capsys, llama_hf_dir):
    rc, out, err = run_cli(capsys, "inspect", llama_hf_dir)
    assert rc == 0 and err == ""
