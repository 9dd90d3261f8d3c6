"""`python -m spotckpt.tools.s3server`: a local S3 server to try the CLI against, stopped by Ctrl-C."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

from tests.helpers import REPO, read_lines_until


def test_s3server_prints_what_to_export_and_stops_on_ctrl_c() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    srv = subprocess.Popen([sys.executable, "-m", "spotckpt.tools.s3server", "--bucket", "try-it"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = read_lines_until(srv, lambda ls: any(ln.startswith("Ctrl-C") for ln in ls), what="the banner")
        (export,) = [ln.strip() for ln in lines if ln.strip().startswith("export ")]
        client_env = dict(env, **dict(kv.split("=", 1) for kv in shlex.split(export)[1:]))
        assert client_env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
        res = subprocess.run([sys.executable, "-m", "spotckpt.tools.cli", "ls", "s3://try-it/job"], env=client_env,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and "no committed steps" in res.stdout, res.stderr
        srv.send_signal(signal.SIGINT)
        out, err = srv.communicate(timeout=120)
    finally:
        if srv.poll() is None:
            srv.kill()
    assert srv.returncode == 0, err
    assert "S3 server stopped; its data is gone." in out
    res = subprocess.run([sys.executable, "-m", "spotckpt.tools.cli", "ls", "s3://try-it/job"], env=client_env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0  # nothing answers there any more


def test_a_burst_of_ctrl_c_stops_it_cleanly() -> None:
    """Ctrl-C pressed again and again: each one only asks the server to stop. (It used to raise
    wherever it landed -- inside Popen.poll() between its lock and the release, the stop's wait
    for the server then never returned; during the stop, a second Ctrl-C cut the cleanup short.)"""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    srv = subprocess.Popen([sys.executable, "-m", "spotckpt.tools.s3server", "--bucket", "try-it"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        read_lines_until(srv, lambda ls: any(ln.startswith("Ctrl-C") for ln in ls), what="the banner")
        for _ in range(200):
            srv.send_signal(signal.SIGINT)
            time.sleep(0.002)
            if srv.poll() is not None:
                break
        out, err = srv.communicate(timeout=120)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    assert srv.returncode == 0, err
    assert "S3 server stopped; its data is gone." in out and "Traceback" not in err, (out, err)


def test_a_server_started_on_some_cpus_runs_there_only() -> None:
    from spotckpt.tools.s3server import S3Server

    before = os.sched_getaffinity(0)
    one = {max(before)}
    srv = S3Server.start("moto", cpus=one)
    try:
        assert os.sched_getaffinity(srv.process.pid) == one
        assert srv.client().list_buckets()["Buckets"] == []
    finally:
        srv.stop()
    assert os.sched_getaffinity(0) == before  # the caller stays where it was
