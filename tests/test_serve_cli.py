"""``latentdiff serve`` as users start it: a real process on a free port answering a webuiapi client and stopping
cleanly on SIGINT; a port in use, an unloadable checkpoint or contradictory flags exit 2 with one message."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
webuiapi = pytest.importorskip("webuiapi", reason="webuiapi (dev extra) is not installed")

from latentdiff.cli.main import main  # noqa: E402


def run(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_port_in_use_exits_2_with_one_message(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, err = run(["serve", "--port", str(port)], capsys)
    assert code == 2 and f"port {port} on 127.0.0.1 is already in use" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["--ckpt", "no/such/model.safetensors"], "no/such/model.safetensors"),
    (["--api-auth", "nocolon"], "USER:PASS"),
    (["--min-replicas", "2"], "--max-replicas"),
    (["--min-replicas", "3", "--max-replicas", "2"], "above --max-replicas"),
    (["--host", "no.such.host.invalid"], "cannot listen"),
])
def test_bad_flags_exit_2(argv, message, capsys):
    code, err = run(["serve", "--port", "0", *argv], capsys)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_serve_process_answers_webuiapi_and_stops_on_sigint(tmp_path):
    env = {**os.environ, "LATENTDIFF_API_KEY": "k3y"}
    proc = subprocess.Popen([sys.executable, "tools/serve.py", "--port", "0", "--device", "cpu"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        port = None
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the server exited"
            match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            port = int(match.group(1)) if match else None
        assert port, "no startup line"
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port, username="me", password="k3y")  # key as password
        r = api.txt2img(prompt="a photo of a ship", seed=3, width=32, height=32, steps=2)
        assert r.info["all_seeds"] == [3] and "Seed: 3" in r.image.info["parameters"]
        assert webuiapi.WebUIApi(host="127.0.0.1", port=port).session.get(
            f"http://127.0.0.1:{port}/sdapi/v1/sd-models").status_code == 401  # the env var's key is required
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
