"""`python -m serving --frontends N`: N gRPC servers on one port, one engine process.

The supervisor (this module, in the process `python -m serving` started) runs:
- the engine process (`serving.remote.host`, through an owning `EngineLink`): every step
  model's continuous batch, shared by all frontends, so their streams batch together;
  restarted if it dies;
- N frontends, each `python -m serving` with the same flags plus `--frontend-of` the
  engine's address: a full server with its own event loop, GIL and thread pool, bound to
  the same port with SO_REUSEPORT (the kernel spreads new connections over them), its
  step models' jobs sent to the shared engine, its classifiers run in its own process.
  One that exits unexpectedly is started again;
- the Prometheus port: each scrape sums the frontends' pages (`serving.metrics.merge`),
  plus `stepwise_frontends`, how many answered.

What stays per frontend (README, "Several frontends on one port"): KServe server-held
sequences live in the frontend whose connection started them (a client that reconnects
may land on another, which does not know them), stream and sequence limits hold per
frontend, and dynamic batching batches one frontend's requests. ModelStatistics answers
for all of them (`serving.remote.peers`). Explicit model control would reach one
frontend, so `--frontends` above 1 takes `none` or `poll` (each frontend polls the
repository; the engine process loads each version once, as their keys share a
fingerprint).

Signals: SIGINT or SIGTERM to the supervisor is passed to every frontend as SIGTERM
(they are in sessions of their own, so a terminal's Ctrl-C reaches the supervisor
alone); they drain as one server would, and the engine process stops after the last. A
frontend drains once whoever signals it (a service manager may signal every process);
the supervisor's second signal makes them exit at once (SIGUSR2). A frontend drains
when its supervisor dies (PR_SET_PDEATHSIG), and the engine process stops (its owner's
connection closes).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from serving.api.security import metrics_ssl_context
from serving.app import engine_runtime
from serving.config import ServerConfig
from serving.metrics.endpoint import MetricsEndpoint
from serving.metrics.merge import merge
from serving.remote import peers
from serving.remote.link import EngineLink

log = logging.getLogger("serving")

READY_TIMEOUT_S = 600.0  # a frontend loads its models and serves within this
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 15.0)  # before starting an exited frontend again
STEADY_S = 30.0  # a frontend that served this long before exiting starts the backoff anew
SCRAPE_TIMEOUT_S = 5.0
KEY_ENV = "STEPWISE_ENGINE_KEY"
# What a frontend hears from its supervisor: drain (as a server does on SIGTERM; a second
# SIGTERM, from the supervisor or from a service manager that signals every process of
# the group, changes nothing), or exit at once (the supervisor's second signal).
DRAIN, EXIT_NOW = signal.SIGTERM, signal.SIGUSR2
SUPERVISOR_ENV = "STEPWISE_SUPERVISOR_PID"


class Frontend:
    """One frontend process: started with a pipe it writes one JSON line to once it
    serves ({"port", "metrics_port"})."""

    def __init__(self, index: int, command: list[str], env: dict):
        self.index, self.command, self.env = index, command, env
        self.proc: subprocess.Popen | None = None
        self.metrics_port: int | None = None

    def start(self) -> None:
        read, write = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [*self.command, "--ready-fd", str(write)],
                env=self.env,
                pass_fds=(write,),
                start_new_session=True,  # a terminal's Ctrl-C is the supervisor's to pass on
            )
        finally:
            os.close(write)
        self._ready = read
        self.metrics_port = None

    def wait_ready(self, stop: threading.Event) -> dict:
        """Its ready line, once it serves (RuntimeError if it exits first, or in
        READY_TIMEOUT_S; InterruptedError if `stop` is set meanwhile)."""
        deadline, data = time.monotonic() + READY_TIMEOUT_S, b""
        try:
            while b"\n" not in data:
                if stop.is_set():
                    raise InterruptedError("stopping")
                if time.monotonic() > deadline:
                    self.proc.kill()  # a late one would serve unwatched
                    self.proc.wait()
                    raise RuntimeError(f"frontend {self.index} did not serve in time")
                if select.select([self._ready], [], [], 0.25)[0]:
                    chunk = os.read(self._ready, 4096)
                    if not chunk:
                        code = self.proc.wait()
                        raise RuntimeError(f"frontend {self.index} exited ({code}) at start")
                    data += chunk
        finally:
            os.close(self._ready)
        ready = json.loads(data.split(b"\n", 1)[0])
        self.metrics_port = ready["metrics_port"]
        return ready

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signum)
            except ProcessLookupError:
                pass


class FrontendMetrics:
    """The frontends' pages summed, read at scrape time (`render()`, as `Metrics`). The
    counters of a frontend's processes that exited, and of one that did not answer this
    time, stay in the sum (their last page, carried), so no summed counter goes down."""

    def __init__(self, frontends: list[Frontend]):
        self.frontends = frontends
        self._lock = threading.Lock()  # scrapes may overlap
        self._last: dict[int, tuple[int, str]] = {}  # index -> (pid, its latest page)
        self._carried: dict[int, str] = {}  # index -> the counters of its exited processes

    def render(self) -> bytes:
        with self._lock:
            pages, carried, spread = [], [], []
            for frontend in list(self.frontends):
                pid = frontend.proc.pid if frontend.proc is not None else None
                last = self._last.get(frontend.index)
                if last is not None and last[0] != pid:  # that process is gone
                    gone = [self._carried.get(frontend.index, ""), last[1]]
                    self._carried[frontend.index] = merge([], gone)
                    del self._last[frontend.index]
                    last = None
                own = [self._carried[frontend.index]] if frontend.index in self._carried else []
                page = _scrape(frontend)
                if page is not None:
                    self._last[frontend.index] = pid, page
                    pages.append(page)
                elif last is not None:  # did not answer: its last counters, not its gauges
                    own.append(last[1])
                carried += own
                spread.append((frontend.index, _requests(merge([page or ""], own))))
        rows = "".join(
            f'stepwise_frontend_requests_total{{frontend="{index}",rpc="{rpc}"}} {n}\n'
            for index, counts in spread
            for rpc, n in sorted(counts.items())
        )
        head = (
            "# HELP stepwise_frontends gRPC frontend processes whose metrics this page sums\n"
            f"# TYPE stepwise_frontends gauge\nstepwise_frontends {len(pages)}\n"
            "# HELP stepwise_frontend_requests_total RPCs answered, by frontend and RPC\n"
            f"# TYPE stepwise_frontend_requests_total counter\n{rows}"
        )
        return (head + merge(pages, carried)).encode()


def _scrape(frontend: Frontend) -> str | None:
    if frontend.metrics_port is None:  # starting
        return None
    try:
        return peers.fetch(frontend.metrics_port, "/metrics", SCRAPE_TIMEOUT_S).decode()
    except OSError as exc:  # exited or restarting: the others are still summed
        log.warning("metrics: frontend %d did not answer: %s", frontend.index, exc)
        return None


_RPC = re.compile(r'^stepwise_requests_total\{[^}]*rpc="([^"]*)"[^}]*\} (\S+)$', re.M)


def _requests(page: str) -> dict[str, int]:
    """RPC -> the calls one frontend's page counts (stepwise_requests_total, any code)."""
    counts: dict[str, int] = {}
    for rpc, value in _RPC.findall(page):
        counts[rpc] = counts.get(rpc, 0) + int(float(value))
    return counts


def _check_port_free(host: str, port: int) -> None:
    """The frontends share their port with SO_REUSEPORT, which would also share it with
    another server that set it: a port in use (on any address `host` names) is refused
    here first."""
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
        for family, _, _, _, address in addresses:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is free
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


class Supervisor:
    """`count` frontends over one engine process (see the module's doc). `argv` is the
    command line the supervisor was given; each frontend gets it, with its own flags
    last."""

    def __init__(self, config: ServerConfig, argv: list[str], count: int):
        self.config, self.argv, self.count = config, argv, count
        self.stop_requested = threading.Event()
        self.frontends: list[Frontend] = []
        self.loop = asyncio.new_event_loop()  # the engine link reads its socket here
        threading.Thread(target=self.loop.run_forever, name="engine-link", daemon=True).start()
        self.link = EngineLink(engine_runtime(config), self.loop)
        self.metrics_endpoint = None
        self.port = config.port

    def _command(self, port: int) -> list[str]:
        return [
            sys.executable, "-m", "serving", *self.argv,
            "--frontends", "1", "--frontend-of", self.link.address, "--port", str(port),
        ]  # fmt: skip

    def start(self) -> int:
        """Start the engine process and the frontends; the port they share, once every
        one serves. On failure everything started is stopped and the error raised."""
        c = self.config
        try:
            if c.port:
                _check_port_free(c.host, c.port)
            self.link.start()
            env = dict(os.environ, **{KEY_ENV: self.link.authkey.hex()})
            env[SUPERVISOR_ENV] = str(os.getpid())
            first = Frontend(0, self._command(c.port), env)
            self.frontends.append(first)
            first.start()
            if not c.port:  # the first picks it; the others join it
                self.port = first.wait_ready(self.stop_requested)["port"]
            for i in range(1, self.count):
                self.frontends.append(Frontend(i, self._command(self.port), env))
                self.frontends[-1].start()
            for frontend in self.frontends:
                if frontend.metrics_port is None:
                    frontend.wait_ready(self.stop_requested)
            self._tell_peers()
            if c.metrics_port is not None:
                token = c.security.auth_token if c.security.auth_all else None
                self.metrics_endpoint = MetricsEndpoint(
                    FrontendMetrics(self.frontends), c.host, c.metrics_port, token,
                    metrics_ssl_context(c.security),
                )  # fmt: skip
                self.metrics_endpoint.start()
        except BaseException:
            self._kill()
            raise
        return self.port

    def supervise(self) -> None:
        """Until a stop is asked for: start again any frontend that exited. On this
        (the main) thread: a frontend dies with the thread that started it."""
        backoff: dict[int, int] = {}  # index -> restarts in a row that did not last
        started = {f.index: time.monotonic() for f in self.frontends}
        while not self.stop_requested.wait(0.25):
            for frontend in self.frontends:
                code = frontend.proc.poll()
                if code is None or self.stop_requested.is_set():
                    continue
                if time.monotonic() - started[frontend.index] > STEADY_S:
                    backoff.pop(frontend.index, None)  # it had served a while: not a loop
                attempt = backoff.get(frontend.index, 0)
                backoff[frontend.index] = attempt + 1
                log.error(
                    "frontend %d (pid %d) exited (%s); starting it again",
                    frontend.index, frontend.proc.pid, code,
                )  # fmt: skip
                wait = RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)]
                if self.stop_requested.wait(wait):
                    return
                frontend.start()
                started[frontend.index] = time.monotonic()
                try:
                    frontend.wait_ready(self.stop_requested)
                    self._tell_peers()
                    log.info("frontend %d serves again (pid %d)", frontend.index, frontend.proc.pid)
                except InterruptedError:
                    return
                except RuntimeError as exc:
                    log.error("%s", exc)

    def _tell_peers(self) -> None:
        """Where each frontend's statistics are, for the others (`serving.remote.peers`)."""
        ports = [f.metrics_port for f in self.frontends if f.metrics_port is not None]
        peers.write(os.path.dirname(self.link.address), ports)

    def stop(self, timeout: float) -> None:
        """Pass SIGTERM to every frontend, wait for them (up to `timeout`, then kill),
        then stop the engine process."""
        for frontend in self.frontends:
            frontend.signal(DRAIN)
        deadline = time.monotonic() + timeout
        for frontend in self.frontends:
            try:
                frontend.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("frontend %d did not stop in time; killing it", frontend.index)
                frontend.proc.kill()
                frontend.proc.wait()
        self._close()

    def _kill(self) -> None:
        for frontend in self.frontends:
            if frontend.proc is not None and frontend.proc.poll() is None:
                frontend.proc.kill()
                frontend.proc.wait()
        self._close()

    def _close(self) -> None:
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
        self.link.close()
        self.loop.call_soon_threadsafe(self.loop.stop)


def serve(config: ServerConfig, argv: list[str], count: int) -> int:
    """Run `count` frontends until SIGINT or SIGTERM; the exit status."""
    if config.model_control_mode == "explicit":
        log.error(
            "--frontends %d takes --model-control-mode none or poll: a LoadModel or "
            "UnloadModel would reach one frontend of %d", count, count,
        )  # fmt: skip
        return 1
    supervisor = Supervisor(config, argv, count)
    signals = 0

    def on_signal(signum, _frame):
        nonlocal signals
        signals += 1
        if signals > 1:  # the second: the frontends exit at once
            log.warning("second %s: the frontends exit at once", signal.Signals(signum).name)
            for frontend in supervisor.frontends:
                frontend.signal(EXIT_NOW)
            return
        log.info("%s received: passing it to %d frontends", signal.Signals(signum).name, count)
        supervisor.stop_requested.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        port = supervisor.start()
    except InterruptedError:
        return 0
    except (OSError, RuntimeError) as exc:
        log.error("%s", exc)
        return 1
    log.info(
        "serving on %s:%d with %d frontends (pids %s) over engine process %d",
        config.host, port, count, ", ".join(str(f.proc.pid) for f in supervisor.frontends),
        supervisor.link.process.pid,
    )  # fmt: skip
    try:
        supervisor.supervise()
    finally:  # whatever broke: the frontends drain before the engine process stops
        supervisor.stop(config.drain_delay_s + config.grace_period_s + 30)
    log.info("stopped")
    return 0
