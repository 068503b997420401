"""Ctrl-C: during start-up (the heavy imports) or during a command, `splice` prints one line
``splice: interrupted``, exits 130, shows no traceback and leaves no output behind."""
import os
import signal
import subprocess
import sys
import time

import pytest


def interrupted(argv, after_s: float, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "splice", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    time.sleep(after_s)
    assert proc.poll() is None, "the command ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# 1 s: inside the imports of torch and the passes (start-up); 8 s: inside capture or the ONNX export
@pytest.mark.parametrize("after_s", [1.0, 8.0], ids=["start-up", "command"])
def test_ctrl_c_is_one_line(llama_hf_dir, tmp_path, after_s):
    dest = tmp_path / "out" / "m.onnx"
    proc = interrupted(["export", llama_hf_dir, "--onnx", dest, "--check"], after_s, tmp_path)
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert proc.stderr == "splice: interrupted\n", proc.stderr
    assert list(tmp_path.iterdir()) == []  # no file, no temporary, no parent directory
