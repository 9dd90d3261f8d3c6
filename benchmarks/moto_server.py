"""moto's S3 server on 127.0.0.1 in a process of its own, for the S3 benchmarks.

In the benchmark's own process the server would share one GIL with the client and measure the
fake server's contention rather than the client's transfer settings.
"""

from __future__ import annotations

import subprocess
import sys

_SERVER = """
import logging, signal, sys, threading
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.server import ThreadedMotoServer
srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
srv.start()
print(*srv.get_host_and_port(), flush=True)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
threading.Event().wait()
"""


def start() -> tuple[subprocess.Popen[str], str, str]:
    """Start the server; returns (process, host, port). Terminate the process when done."""
    srv = subprocess.Popen([sys.executable, "-c", _SERVER], stdout=subprocess.PIPE, text=True)
    assert srv.stdout is not None
    host, port = srv.stdout.readline().split()
    return srv, host, port
