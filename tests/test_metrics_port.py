"""The metrics port under hostile clients (issue 17): a cap on live connections, a
deadline for each request's headers, a listen backlog for bursts. Real sockets on
loopback against a `MetricsEndpoint` over an empty model registry, so no model is built.
"""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from serving.metrics.endpoint import MetricsEndpoint
from serving.metrics.prometheus import Metrics
from serving.metrics.statistics import Statistics

SLACK_S = 10.0  # generous: the test machine is small and busy; no test waits this long


@pytest.fixture()
def endpoints():
    """Makes started endpoints (keywords as MetricsEndpoint's) and stops them after."""
    made = []

    def make(**kwargs) -> MetricsEndpoint:
        metrics = Metrics(SimpleNamespace(models={}), Statistics())
        endpoint = MetricsEndpoint(metrics, "127.0.0.1", 0, **kwargs)
        endpoint.start()
        made.append(endpoint)
        return endpoint

    yield make
    for endpoint in made:
        endpoint.stop()


def _scrape(port: int, context: ssl.SSLContext | None = None) -> tuple[int, str]:
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=SLACK_S)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=SLACK_S, context=context)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def _slow_loris(port: int, n: int) -> list[socket.socket]:
    """`n` connections that each send half a request line and then nothing."""
    held = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=SLACK_S)
        held.append(s)
        try:
            s.sendall(b"GET /metr")
        except OSError:  # already refused and reset by the server
            pass
    return held


def _closed_by_server(s: socket.socket, within_s: float) -> bool:
    """Whether the server ends `s` (FIN or reset) within `within_s` seconds."""
    s.settimeout(within_s)
    try:
        return s.recv(1) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


def _wait_for(predicate, within_s: float = SLACK_S) -> bool:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _accepted_descriptors(port: int) -> int:
    """Descriptors this process holds for connections accepted on `port`: neither the
    listening socket nor the clients' ends (matched by inode in /proc/net/tcp)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed since listdir
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:[") : -1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()  # sl local_address rem_address st ... inode (index 9)
        local_port, state, inode = int(fields[1].split(":")[1], 16), fields[3], fields[9]
        count += local_port == port and state != "0A" and inode in inodes  # 0A: LISTEN
    return count


def _handler_threads() -> int:
    return sum("process_request_thread" in t.name for t in threading.enumerate())


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="counts descriptors in /proc")
def test_connections_past_the_cap_are_closed_at_once_and_hold_nothing(endpoints, caplog):
    """200 slow-loris sockets: 4 get a slot, 196 are closed on accept with one warning
    logged; the server side holds at most 4 threads and 4 descriptors. (The header
    deadline is a minute here, so no slot frees itself while we count.)"""
    caplog.set_level(logging.WARNING, logger="serving.metrics.endpoint")
    endpoint = endpoints(max_connections=4, header_timeout_s=60)
    threads_before = _handler_threads()
    held = _slow_loris(endpoint.port, 200)
    try:
        assert _wait_for(lambda: endpoint.refused == 196), endpoint.refused
        assert endpoint.active == 4
        assert _accepted_descriptors(endpoint.port) <= 4
        assert _handler_threads() - threads_before <= 4
        assert sum(_closed_by_server(s, 0.01) for s in held) == 196
        warnings = [r for r in caplog.records if r.name == "serving.metrics.endpoint"]
        assert len(warnings) == 1 and "max_connections=4" in warnings[0].getMessage()
    finally:
        for s in held:
            s.close()
    assert _wait_for(lambda: endpoint.active == 0)  # a client that leaves frees its slot
    status, body = _scrape(endpoint.port)
    assert status == 200 and "stepwise_live_streams" in body
    assert _wait_for(lambda: _accepted_descriptors(endpoint.port) == 0)


def test_a_silent_client_within_the_cap_holds_up_no_scrape(endpoints):
    endpoint = endpoints(max_connections=4)  # the default header deadline: seconds away
    with socket.create_connection(("127.0.0.1", endpoint.port)) as silent:
        assert _wait_for(lambda: endpoint.active == 1)
        assert _scrape(endpoint.port)[0] == 200
        assert not _closed_by_server(silent, 0.05)


def test_headers_not_in_by_the_deadline_end_the_connection(endpoints):
    """A silent client and one trickling a header byte every 0.1 s (never idle long
    enough for the 10 s idle timeout) fill both slots; both are cut at the 0.5 s header
    deadline, and the freed slots answer a scrape."""
    endpoint = endpoints(max_connections=2, header_timeout_s=0.5)
    start = time.monotonic()
    silent = socket.create_connection(("127.0.0.1", endpoint.port))
    trickler = socket.create_connection(("127.0.0.1", endpoint.port))
    try:
        trickler.sendall(b"GET /metrics HTTP/1.0\r\nX-Slow: ")
        cut = None
        while cut is None and time.monotonic() - start < 0.5 + SLACK_S:
            try:
                trickler.sendall(b"a")
            except ConnectionError:
                cut = time.monotonic() - start
            if _closed_by_server(trickler, 0.1):
                cut = time.monotonic() - start
        assert cut is not None and cut >= 0.5
        assert _closed_by_server(silent, SLACK_S)
        assert time.monotonic() - start < 0.5 + SLACK_S
        assert _wait_for(lambda: endpoint.active == 0)
        assert _scrape(endpoint.port)[0] == 200
    finally:
        silent.close()
        trickler.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_a_tls_handshake_not_done_by_the_deadline_ends_the_connection(endpoints, tmp_path):
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem",
         "-out", "cert.pem", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        cwd=tmp_path, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    endpoint = endpoints(ssl_context=server_context, max_connections=2, header_timeout_s=0.5)
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", endpoint.port)) as silent:  # no ClientHello
        status, body = _scrape(
            endpoint.port, ssl.create_default_context(cafile=tmp_path / "cert.pem")
        )
        assert status == 200 and "stepwise_live_streams" in body
        assert _closed_by_server(silent, SLACK_S)
        assert time.monotonic() - start >= 0.5
    assert _wait_for(lambda: endpoint.active == 0)


def test_a_burst_of_connections_queues_in_the_listen_backlog():
    """With the accept loop not yet running, 100 connections all complete their TCP
    handshake in the kernel's queue (a backlog of 5 would leave the rest retrying SYNs)."""
    endpoint = MetricsEndpoint(
        Metrics(SimpleNamespace(models={}), Statistics()), "127.0.0.1", 0
    )  # never started
    queued = []
    try:
        for _ in range(100):
            queued.append(socket.create_connection(("127.0.0.1", endpoint.port), timeout=3))
    finally:
        for s in queued:
            s.close()
        stopper = threading.Thread(target=endpoint.stop, daemon=True)
        stopper.start()
        stopper.join(SLACK_S)
    assert len(queued) == 100
    assert not stopper.is_alive()  # stop() returns though serve_forever never ran


def test_limits_are_checked_when_the_endpoint_is_made():
    metrics = Metrics(SimpleNamespace(models={}), Statistics())
    with pytest.raises(ValueError, match="max_connections: must be at least 1, got 0"):
        MetricsEndpoint(metrics, "127.0.0.1", 0, max_connections=0)
    with pytest.raises(ValueError, match="header_timeout_s: must be above 0, got 0"):
        MetricsEndpoint(metrics, "127.0.0.1", 0, header_timeout_s=0)
