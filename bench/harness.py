"""The one harness for code that starts `python -m serving` and measures it: the tests,
the benchmarks, deploy/topology.py. serving/ never imports it.

    with start(["--model-repository", "model_repository", "--device", "cpu"], log=path) as server:
        ...  # server.target is ready (gRPC health SERVING); server.pid is its process

- `free_port()`: a loopback port nothing listens on (bound, then released).
- `start(args, ...)`: `python -m serving --host H --port P --metrics-port 0 ARGS` as a
  child process on a free port, returned once it is ready; `NotReady` (the process
  stopped, the end of its output in the message) when it exits first or misses the
  timeout. Leaving the `with` block stops it.
- `stop(proc)`: SIGTERM, SIGKILL after a timeout; to the process's group when it leads
  one of its own (`start_new_session=True`), else to the process alone.
- `until(what, check, timeout)`: poll until `check()` is truthy, else TimeoutError.
- `memory(pid)`, `rss_bytes(pid)`, `peak_rss_bytes(pid)`, `reset_peak(pid)`: VmRSS and
  VmHWM from /proc/PID/status (Linux).
- `children(pid, command)`, `alive(pid)`: a process's live child processes (a server's
  engine process), and whether a process still runs (not a zombie), from /proc.

grpc is imported where it is used: the memory readers also run in child processes that
measure their own RSS and should load nothing more than they need.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"


class NotReady(RuntimeError):
    """A server exited, or did not answer as ready, before its timeout."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on `host` that nothing listened on a moment ago (the OS's choice)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _transient() -> tuple[type[BaseException], ...]:
    """What a check may raise while its server is still coming up."""
    import grpc

    return (OSError, ValueError, grpc.RpcError, grpc.FutureTimeoutError)


def until(what: str, check: Callable, timeout: float, interval: float = 0.2):
    """Call `check` until it returns something truthy and return that; TimeoutError
    after `timeout` s (naming `what` and the last transient error)."""
    transient = _transient()
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except transient as exc:
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:g} s (last: {last!r})")


def health_serving(target: str) -> bool:
    """Whether the gRPC health service at `target` says SERVING (a new connection)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=1
        )
    return status.status == health_pb2.HealthCheckResponse.SERVING


def connects(target: str) -> bool:
    """Whether a gRPC channel to `target` connects within a second: the readiness of
    servers without a health service (bench.echo_server, bench.baseline_server)."""
    import grpc

    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=1)
    return True


def loopback_config(model_repository, **overrides):
    """An in-process server's `serving.config.ServerConfig` for tests and tools: loopback
    only, a free port, the CPU, no metrics port; `overrides` change any of it. (The
    configuration's own defaults are the command line's: every interface, 8001, 8002.)"""
    from serving.config import ServerConfig

    settings = {"host": LOOPBACK, "port": 0, "device": "cpu", "metrics_port": None}
    return ServerConfig(model_repository, **{**settings, **overrides})


def spawn(args: Sequence[str], log: Path | None = None, **popen) -> subprocess.Popen:
    """`args` as a child process; stdout and stderr to the file `log` when given (this
    process keeps no handle on it), else as `popen` says, else nowhere (DEVNULL)."""
    if log is None:
        popen.setdefault("stdout", subprocess.DEVNULL)
        popen.setdefault("stderr", subprocess.STDOUT)
        return subprocess.Popen(list(args), **popen)
    with log.open("w") as out:
        return subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT, **popen)


def stop(proc: subprocess.Popen, timeout: float = 10) -> int | None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` s; its exit status
    (None if even SIGKILL left it running for `timeout` s). The signals go to the
    process's group when it leads a session of its own (its children stop with it),
    else to this one process."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                if os.getpgid(proc.pid) == proc.pid:
                    os.killpg(proc.pid, sig)
                else:
                    proc.send_signal(sig)
        with suppress(subprocess.TimeoutExpired):
            return proc.wait(timeout=timeout)
    return None


@dataclass
class Server:
    """A server child process listening on HOST:PORT."""

    proc: subprocess.Popen
    host: str
    port: int
    name: str = "server"
    log: Path | None = None  # its stdout and stderr, when they go to a file
    stop_timeout_s: float = 30.0  # SIGTERM to SIGKILL: serving drains 5 s by default
    _piped: str | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def wait_ready(
        self, timeout: float = 120.0, check: Callable[[str], bool] = health_serving
    ) -> None:
        """Return once `check(target)` is true; NotReady if the process exits first or
        `timeout` s pass (the process is left as it is; with a log file, the message
        ends with the log's end)."""

        def ready() -> bool:
            code = self.proc.poll()
            if code is not None:
                raise NotReady(f"{self.name} (pid {self.pid}) exited with status {code}")
            return check(self.target)

        try:
            until(f"{self.name} at {self.target} ready", ready, timeout)
        except (TimeoutError, NotReady) as exc:
            tail = f"; its log ends:\n{self.output()[-2000:]}" if self.log else ""
            raise NotReady(f"{exc}{tail}") from None

    def output(self) -> str:
        """What it has written: its log file, or its piped stdout once it has exited
        (read once, then kept); '' while a piped server runs."""
        if self.log is not None:
            return self.log.read_text(errors="replace")
        if self._piped is None and self.proc.stdout is not None and self.proc.poll() is not None:
            data = self.proc.stdout.read()
            self._piped = data.decode(errors="replace") if isinstance(data, bytes) else data
        return self._piped or ""

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` s (default stop_timeout_s): see stop()."""
        return stop(self.proc, self.stop_timeout_s if timeout is None else timeout)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(
    args: Sequence[str] = (),
    *,
    module: str = "serving",
    name: str | None = None,
    host: str = LOOPBACK,
    port: int | None = None,
    metrics_port: int | None = 0,
    log: Path | None = None,
    ready: Callable[[str], bool] | None = health_serving,
    timeout: float = 120.0,
    stop_timeout: float = 30.0,
    **popen,
) -> Server:
    """`python -m MODULE --host HOST --port PORT [--metrics-port M] ARGS` as a child
    process, once `ready(target)` says so (None: at once, see Server.wait_ready).

    port: None picks a free one. metrics_port: for `serving` only; 0 (the default) turns
    the Prometheus listener off so servers run side by side, None leaves the flag out.
    ARGS come last, so they may override the rest. Output goes to `log`, else as
    `popen` says (stdout=subprocess.PIPE, text=True: read it from server.proc.stdout),
    else nowhere. `popen` also takes cwd, env, preexec_fn, start_new_session.
    On NotReady the process is stopped and the message ends with its output's end
    (unless it went nowhere)."""
    port = free_port(host) if port is None else port
    command = [sys.executable, "-m", module, "--host", host, "--port", str(port)]
    if module == "serving" and metrics_port is not None:
        command += ["--metrics-port", str(metrics_port)]
    proc = spawn([*command, *args], log, **popen)
    server = Server(proc, host, port, name or module, log, stop_timeout)
    if ready is not None:
        try:
            server.wait_ready(timeout, ready)
        except NotReady as exc:
            server.stop(timeout=10)
            piped = "" if log is not None else server.output()[-2000:]  # a log: in exc
            if not piped:
                raise
            raise NotReady(f"{exc}; its output ends:\n{piped}") from None
    return server


# ---- processes, from /proc/PID/stat ----------------------------------------------------


def _stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first, then the parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def children(pid: int, command: str | None = None) -> list[int]:
    """The live child processes of `pid`, those whose command line holds `command` when
    given."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(entry.name)
        if stat is None or int(stat[1]) != pid or stat[0] == "Z":
            continue
        if command is not None:
            try:
                if command.encode() not in (entry / "cmdline").read_bytes():
                    continue
            except OSError:
                continue
        found.append(int(entry.name))
    return found


# ---- memory, from /proc/PID/status -----------------------------------------------------


def memory(pid: int | str = "self") -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (the peak since exec or reset_peak) of a process,
    in bytes; zeros once it is gone."""
    fields = {"VmRSS": 0, "VmHWM": 0}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in fields:
            fields[key] = int(value.split()[0]) * 1024  # kB
    return fields


def _field(pid: int | str, key: str) -> int:
    value = memory(pid)[key]
    if not value:
        raise ProcessLookupError(f"no {key} in /proc/{pid}/status: the process is gone")
    return value


def rss_bytes(pid: int | str = "self") -> int:
    """A process's resident set now (VmRSS), in bytes; ProcessLookupError once gone."""
    return _field(pid, "VmRSS")


def peak_rss_bytes(pid: int | str = "self") -> int:
    """A process's peak resident set (VmHWM: reset by exec and by reset_peak, unlike
    ru_maxrss, which a child inherits), in bytes; ProcessLookupError once gone."""
    return _field(pid, "VmHWM")


def reset_peak(pid: int | str) -> None:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
