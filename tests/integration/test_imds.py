"""The IMDSv2 spot-notice poller against a fake metadata server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from spotckpt.errors import ConfigError
from spotckpt.core.preemption import ImdsPoller, PreemptionWatcher

TOKEN = "fake-token-AQAEAF"


class FakeImds:
    """A tiny IMDSv2: token required, configurable instance-action and rebalance answers."""

    def __init__(self) -> None:
        self.action: dict | None = None  # None -> 404
        self.action_raw: bytes | None = None  # overrides action with a raw body
        self.rebalance: dict | None = None
        self.requests: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, body: bytes = b"") -> None:
                with fake.lock:
                    fake.requests.append((self.command, self.path, code))
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:
                if self.path != "/latest/api/token":
                    return self._send(404)
                if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._send(400)
                self._send(200, TOKEN.encode())

            def do_GET(self) -> None:
                if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                    return self._send(401)
                if self.path == "/latest/meta-data/spot/instance-action":
                    if fake.action_raw is not None:
                        return self._send(200, fake.action_raw)
                    if fake.action is None:
                        return self._send(404)
                    return self._send(200, json.dumps(fake.action).encode())
                if self.path == "/latest/meta-data/events/recommendations/rebalance":
                    if fake.rebalance is None:
                        return self._send(404)
                    return self._send(200, json.dumps(fake.rebalance).encode())
                self._send(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), name="fake-imds", daemon=True)

    def codes(self, method: str, path_part: str) -> list[int]:
        with self.lock:
            return [c for m, p, c in self.requests if m == method and path_part in p]


@pytest.fixture
def imds() -> Iterator[FakeImds]:
    fake = FakeImds()
    fake.thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()
    fake.thread.join()


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_notice_requests_preemption_with_deadline(imds: FakeImds) -> None:
    notice_at = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=100)
    imds.action = {"action": "terminate", "time": _iso(notice_at)}
    watcher = PreemptionWatcher(grace_seconds=30)
    poller = ImdsPoller(watcher, endpoint=imds.url, interval_seconds=0.05)
    t_before = time.time()
    poller.start()
    assert watcher.wait(timeout=30), "poller never delivered the notice"
    poller.close()
    assert watcher.requested
    assert "EC2 spot notice: terminate at" in watcher.reason
    assert poller.notice == {"action": "terminate", "time": _iso(notice_at)}
    # The deadline matches the notice time (not the watcher's 30 s grace), converted to monotonic.
    expected_left = notice_at.timestamp() - t_before
    left = watcher.seconds_left()
    assert left is not None and expected_left - 30 < left <= expected_left + 1
    assert left > 31  # would be <= 30 had the grace been used
    # IMDSv2: a token was fetched and every GET carried it.
    assert imds.codes("PUT", "/latest/api/token") and 401 not in imds.codes("GET", "")
    assert not poller._thread.is_alive()  # type: ignore[union-attr]


def test_notice_with_deadline_in_the_past_means_now(imds: FakeImds) -> None:
    imds.action = {"action": "stop", "time": "2020-01-01T00:00:00Z"}
    watcher = PreemptionWatcher(grace_seconds=30)
    assert ImdsPoller(watcher, endpoint=imds.url).poll_once()
    assert watcher.requested and watcher.seconds_left() == 0.0
    assert "stop" in watcher.reason


def test_no_notice_404_does_nothing(imds: FakeImds) -> None:
    watcher = PreemptionWatcher()
    poller = ImdsPoller(watcher, endpoint=imds.url, interval_seconds=0.02)
    with poller:
        deadline = time.monotonic() + 30
        while len(imds.codes("GET", "instance-action")) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert imds.codes("GET", "instance-action")[:5] == [404] * 5
    assert not watcher.requested and watcher.deadline is None
    assert len(imds.codes("PUT", "token")) == 1  # the token is reused between polls


def test_rejected_token_is_refetched(imds: FakeImds) -> None:
    watcher = PreemptionWatcher()
    poller = ImdsPoller(watcher, endpoint=imds.url)
    assert not poller.poll_once()
    poller._token = "stale"  # as if revoked / expired on the server
    assert not poller.poll_once()  # 401 -> drop the token
    imds.action = {"action": "terminate", "time": "2030-01-01T00:00:00Z"}
    assert poller.poll_once()  # fresh token, notice seen
    assert watcher.requested
    assert len(imds.codes("PUT", "token")) == 2


def test_rebalance_logged_by_default_and_requested_when_opted_in(
    imds: FakeImds, caplog: pytest.LogCaptureFixture
) -> None:
    imds.rebalance = {"noticeTime": "2030-01-01T00:00:00Z"}
    watcher = PreemptionWatcher()
    with caplog.at_level(logging.WARNING, logger="spotckpt.core.preemption"):
        assert not ImdsPoller(watcher, endpoint=imds.url).poll_once()
    assert not watcher.requested
    assert "rebalance recommendation" in caplog.text
    watcher2 = PreemptionWatcher(grace_seconds=42)
    assert not ImdsPoller(watcher2, endpoint=imds.url, watch_rebalance=True).poll_once()
    assert watcher2.requested and "rebalance" in watcher2.reason
    left = watcher2.seconds_left()
    assert left is not None and 0 < left <= 42


@pytest.mark.parametrize("raw", [b"not json", b'{"action": "terminate"}', b'{"time": "yesterday"}', b"[]"])
def test_garbage_notice_does_nothing(imds: FakeImds, raw: bytes) -> None:
    imds.action_raw = raw
    watcher = PreemptionWatcher()
    poller = ImdsPoller(watcher, endpoint=imds.url)
    assert not poller.poll_once()
    assert not poller.poll_once()
    assert not watcher.requested


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_endpoint_does_nothing(caplog: pytest.LogCaptureFixture) -> None:
    watcher = PreemptionWatcher()
    poller = ImdsPoller(watcher, endpoint=f"http://127.0.0.1:{_closed_port()}", interval_seconds=0.01)
    with caplog.at_level(logging.DEBUG, logger="spotckpt.core.preemption"):
        with poller:
            deadline = time.monotonic() + 30
            while poller.polls < 5 and time.monotonic() < deadline:
                time.sleep(0.01)
    assert poller.polls >= 5 and not watcher.requested
    assert poller._thread is not None and not poller._thread.is_alive()
    infos = [r for r in caplog.records if r.levelno == logging.INFO and "not usable" in r.getMessage()]
    assert len(infos) == 1  # logged once, not once per poll
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_server_that_does_not_speak_http_does_nothing() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()  # one connection: the token PUT, answered with non-HTTP bytes
        conn.recv(4096)
        conn.sendall(b"garbage garbage\r\n\r\n")
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    watcher = PreemptionWatcher()
    poller = ImdsPoller(watcher, endpoint=f"http://127.0.0.1:{port}")
    assert not poller.poll_once()
    t.join(timeout=30)
    srv.close()
    assert not watcher.requested and poller.notice is None


def test_endpoint_from_env_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    w = PreemptionWatcher()
    monkeypatch.delenv("SPOTCKPT_IMDS_ENDPOINT", raising=False)
    assert ImdsPoller(w).endpoint == "http://169.254.169.254"
    monkeypatch.setenv("SPOTCKPT_IMDS_ENDPOINT", "http://127.0.0.1:9/")
    assert ImdsPoller(w).endpoint == "http://127.0.0.1:9"
    with pytest.raises(ConfigError):
        ImdsPoller(w, endpoint="169.254.169.254")
    with pytest.raises(ConfigError):
        ImdsPoller(w, interval_seconds=0)


def test_manager_turns_a_spot_notice_into_the_final_save(imds: FakeImds, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from spotckpt import CheckpointManager

    monkeypatch.setenv("SPOTCKPT_IMDS_ENDPOINT", imds.url)
    monkeypatch.setenv("SPOTCKPT_IMDS_INTERVAL_SECONDS", "0.05")
    when = datetime.now(timezone.utc) + timedelta(seconds=100)
    imds.action = {"action": "terminate", "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}
    state = {"w": torch_ones()}
    with CheckpointManager(tmp_path, imds=True, every_steps=10**6, metrics=False, install_signal_handlers=False) as mgr:
        # a training loop: the notice arrives on the poller's thread whenever it does; the first
        # maybe_save() that sees it makes the final save (no assumption about which step)
        deadline = time.monotonic() + 30
        step = 0
        saved = False
        while not saved and time.monotonic() < deadline:
            step += 1
            saved = mgr.maybe_save(step, state)
            if not saved:
                assert not mgr.preempted
                time.sleep(0.02)
        assert saved and mgr.preempted and "spot notice" in mgr.watcher.reason
        left = mgr.watcher.seconds_left()
        assert left is not None and 80 < left <= 100
        assert mgr.all_steps() == [step]
        assert not mgr.maybe_save(step + 1, state)  # preempted: no further saves


def torch_ones():  # type: ignore[no-untyped-def]
    import torch

    return torch.ones(4)
