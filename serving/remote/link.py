"""The server's side of its engine process: `EngineLink` starts `python -m
serving.remote`, keeps one connection to it, sends jobs and routes each iteration's
deltas into the jobs' outboxes; `RemoteEngine` is a step model's engine there, with the
interface of `serving.engine.StepEngine` the data plane uses.

The transport is unchanged: a job is built here (validated, the prompt encoded, a
captioner's image encoded), sent pickled without its outbox, and stepped in the engine
process's continuous batch. Its deltas come back one message per engine iteration. The
server's event loop reads the connection itself (an asyncio protocol over the socket,
once `multiprocessing.connection`'s handshake is done): a message wakes the loop once,
and its deltas go into the jobs' own outboxes there, setting their readers' events
directly, with no thread in between (item 2's one wake-up per engine iteration).

Times cross as they are: `time.monotonic()` is the system's CLOCK_MONOTONIC on Linux, the
same clock in both processes, so deadlines, queue times and TTFT need no translation.

When the process dies, every live job ends UNAVAILABLE, the engines report unavailable
(readiness goes false), and the link starts a new process, loads the same model versions
into it and reports available again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import os
import pickle
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from multiprocessing.connection import Client

from serving.core.leases import Leases
from serving.engine import EngineConfig, EngineObserver, EngineStats
from serving.engine.request import batched_wakes
from serving.errors import ModelLoadError, Unavailable

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0  # the process listens within this (imports, not models)
LOAD_TIMEOUT_S = 300.0  # a model version loads within this
STOP_TIMEOUT_S = 10.0
RESTART_BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 5.0)  # waits before successive restarts


def _frame(message) -> bytes:
    """`message` framed as `multiprocessing.connection.Connection.send` frames it."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(data) > 0x7FFFFFFF:
        return struct.pack("!iQ", -1, len(data)) + data
    return struct.pack("!i", len(data)) + data


class _Frames(asyncio.Protocol):
    """The engine process's messages, read on the event loop: each whole frame is
    unpickled and handed to the link, in order."""

    def __init__(self, link: EngineLink):
        self.link, self.buffer, self.transport = link, bytearray(), None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        start = 0
        while len(buffer) - start >= 4:
            (size,) = struct.unpack_from("!i", buffer, start)
            header = 4
            if size == -1:
                if len(buffer) - start < 12:
                    break
                (size,) = struct.unpack_from("!Q", buffer, start + 4)
                header = 12
            end = start + header + size
            if len(buffer) < end:
                break
            try:
                with memoryview(buffer) as view:
                    message = pickle.loads(view[start + header : end])
                self.link._message(message)
            except Exception:  # noqa: BLE001 - one bad message must not end every stream
                log.exception("engine link: a message from the engine process failed")
            start = end
        del buffer[:start]

    def connection_lost(self, exc) -> None:
        self.link._lost(self)


def _on(loop) -> bool:
    """Whether this thread runs `loop`."""
    return asyncio._get_running_loop() is loop


def _fail(job, error: Exception) -> None:
    def close(d):
        d.finished, d.finish_reason, d.error = True, "error", error

    job.outbox.put(close)


class EngineLink:
    """One engine process for the server's step models (see the module's doc).
    `on_change(up)` is called when the process died (False, on the loop) and when it
    serves again (True, from the thread that restarted it)."""

    def __init__(
        self,
        runtime: dict,
        loop,
        on_change=lambda up: None,
        address: str | None = None,
        authkey: bytes | None = None,
    ):
        """With `address` (and its `authkey`), attach to an engine process someone else
        runs (`--frontends N`: the supervisor's, shared by its frontends): connect, and
        when it goes away, end the jobs and connect again once it is back; else start
        and own one."""
        self.runtime = runtime  # device, intra_op_threads, spinning: the process's sessions
        self.loop = loop  # the server's event loop, running on a thread of its own
        self.on_change = on_change
        self.owned = address is None
        self._dir = tempfile.mkdtemp(prefix="stepwise-engine-") if self.owned else None
        self.address = address or os.path.join(self._dir, "engine.sock")
        self.authkey = authkey or secrets.token_bytes(16)
        self._lock = threading.Lock()  # up, the connection, jobs, replies
        self._jobs: dict[int, tuple[RemoteEngine, object]] = {}  # job id -> (engine, job)
        self._engines: dict[str, RemoteEngine] = {}  # key -> engine, what a new process loads
        self._replies: dict[str, Future] = {}
        self.process: subprocess.Popen | None = None
        self._frames: _Frames | None = None  # the live connection
        self.up = False
        self.restarts = 0
        self._restarting = False  # one restart at a time
        self._closing = False
        self._serial = itertools.count(1)  # engine keys: one per deployment, never reused

    # -- the process -------------------------------------------------------------------

    def start(self) -> None:
        """Start the process and connect (raises when it cannot start). Not on the
        loop's thread: the connection is set up there."""
        self._spawn()
        self.up = True

    def _spawn(self) -> None:
        if not self.owned:  # someone else's: connect to it
            frames = self._connect(None)
            with self._lock:
                self._frames = frames
            return
        try:
            os.unlink(self.address)  # a dead process's socket
        except FileNotFoundError:
            pass
        env = dict(os.environ, STEPWISE_ENGINE_KEY=self.authkey.hex())
        command = [sys.executable, "-m", "serving.remote", "--address", self.address]
        command += ["--runtime", json.dumps(self.runtime)]
        process = subprocess.Popen(command, env=env)
        try:
            frames = self._connect(process)
        except BaseException:  # no half-started process is left behind
            process.kill()
            process.wait()
            raise
        with self._lock:
            self.process, self._frames = process, frames
        self._write(("own",))  # the process ends with this connection, no other

    def _connect(self, process: subprocess.Popen | None) -> _Frames:
        """Connect to the process listening at the address (`process`: the one this link
        started, None: someone else's) within START_TIMEOUT_S."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the engine process exited ({process.returncode}) at start")
            try:
                conn = Client(self.address, family="AF_UNIX", authkey=self.authkey)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise RuntimeError("the engine process did not listen in time") from None
                time.sleep(0.02)
        sock = socket.socket(fileno=os.dup(conn.fileno()))  # authenticated: now the loop's
        conn.close()

        async def attach() -> _Frames:
            _, frames = await self.loop.create_unix_connection(lambda: _Frames(self), sock=sock)
            return frames

        return asyncio.run_coroutine_threadsafe(attach(), self.loop).result(START_TIMEOUT_S)

    def close(self) -> None:
        """Stop the process (asked to, it closes its engines and exits) and wait for it.
        Safe on the loop's thread (the server's stop ends there)."""
        self._closing = True
        with self._lock:
            self.up = False
            frames, process = self._frames, self.process
        if self.owned:  # someone else's process goes on serving its other frontends
            try:
                self._write(("stop",))
            except OSError:
                pass
        if process is not None:
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.error("the engine process did not stop in %g s; killing it", STOP_TIMEOUT_S)
                process.kill()
                process.wait()
        if frames is not None and frames.transport is not None:
            try:
                self.loop.call_soon_threadsafe(frames.transport.close)
            except RuntimeError:  # the loop is closed already
                pass
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    # -- messages ----------------------------------------------------------------------

    def _write(self, message: tuple) -> None:
        """Send `message` from any thread (OSError when not connected): at once on the
        loop's thread, else through the loop, in order."""
        frames = self._frames
        if frames is None or frames.transport is None or frames.transport.is_closing():
            raise OSError("not connected to the engine process")
        frame = _frame(message)
        if _on(self.loop):
            frames.transport.write(frame)
        else:
            self.loop.call_soon_threadsafe(frames.transport.write, frame)

    def _message(self, message: tuple) -> None:
        """One message from the engine process, on the loop."""
        if message[0] == "deltas":
            self._deliver(*message[1:])
        elif message[0] == "loaded":
            with self._lock:
                reply = self._replies.pop(message[1], None)
            if reply is not None:
                reply.set_result(message[2])

    def _deliver(self, deltas: list, occupancy: dict, report: dict | None) -> None:
        # First, so a client that has its stream's end (or start) finds them too.
        for key, running_waiting in occupancy.items():
            engine = self._engines.get(key)
            if engine is not None:
                engine.occupied = running_waiting
        for key, (stats, observations) in (report or {}).items():
            engine = self._engines.get(key)
            if engine is not None:
                engine.report(stats, observations)
        with batched_wakes():
            for item in deltas:  # serving.remote.host.wire
                if len(item) == 5:  # parts of a running stream, and when they began
                    entry = self._jobs.get(item[0])
                    if entry is not None:
                        update = lambda acc, i=item: acc.extend(i[1], i[2], i[3])  # noqa: E731
                        entry[1].outbox.put(update, since=item[4])
                    continue
                job_id, delta = item
                with self._lock:
                    entry = self._jobs.pop(job_id) if delta.finished else self._jobs.get(job_id)
                if entry is not None:
                    entry[1].outbox.put(lambda acc, later=delta: acc.merge(later))

    def _lost(self, frames: _Frames) -> None:
        """The process died (or this link closed): end every live job, then restart, on
        a thread of its own (starting a process must not hold the loop)."""
        with self._lock:
            if frames is not self._frames:
                return
            self.up = False
            jobs, self._jobs = list(self._jobs.values()), {}
            replies, self._replies = list(self._replies.values()), {}
        for reply in replies:
            reply.set_result("the engine process exited")
        if self._closing:
            return
        code = self.process.poll() if self.process is not None else None
        log.error(
            "the engine process exited (%s); %d stream(s) end; %s", code, len(jobs),
            "restarting" if self.owned else "connecting again once it is back",
        )  # fmt: skip
        error = Unavailable("the engine process exited while serving this stream; retry")
        with batched_wakes():
            for _, job in jobs:
                _fail(job, error)
        self.on_change(False)
        with self._lock:
            restarting, self._restarting = self._restarting, True
        if not restarting:  # else the restart in progress sees its load fail, and retries
            threading.Thread(target=self._restart, name="engine-restart", daemon=True).start()

    def _restart(self) -> None:
        try:
            for attempt in range(1_000_000):
                if self._closing:
                    return
                time.sleep(RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)])
                self._discard()  # the dead process, or the last attempt's
                try:
                    self._spawn()
                    for engine in list(self._engines.values()):
                        self._load(engine)
                except Exception:  # noqa: BLE001 - try again, slower
                    log.exception("engine process: restart %d failed", attempt + 1)
                    continue
                with self._lock:
                    self.up = not self._closing
                if self._closing:  # the server stopped meanwhile: so does this process
                    self._discard()
                    return
                self.restarts += 1
                if self.owned:
                    log.info("engine process restarted (pid %d)", self.process.pid)
                else:
                    log.info("engine process back: connected again")
                self.on_change(True)
                return
        finally:
            with self._lock:
                self._restarting = False

    def _discard(self) -> None:
        """Forget the current process: disconnected (its end is not a crash), killed and
        reaped."""
        with self._lock:
            frames, process, self._frames = self._frames, self.process, None
        if frames is not None and frames.transport is not None:
            self.loop.call_soon_threadsafe(frames.transport.close)
        if process is not None and process.poll() is None:
            process.kill()
        if process is not None:
            process.wait()

    # -- what engines ask --------------------------------------------------------------

    def engine(self, model, config: EngineConfig | None = None, observer=None, stats=None):
        """A `RemoteEngine` for `model` (the signature of `StepEngine`'s constructor, for
        `serving.dataplane.deployments.Deployments`); its version is loaded there first.
        Not on the loop's thread: the reply comes through the loop."""
        key = f"{model.name}/{model.version}#{next(self._serial)}"
        engine = RemoteEngine(self, key, model, config or EngineConfig(), observer, stats)
        self._load(engine)
        self._engines[engine.key] = engine
        return engine

    def _load(self, engine: RemoteEngine) -> None:
        reply: Future = Future()
        with self._lock:
            self._replies[engine.key] = reply
        self._write(("load", engine.key, str(engine.model.directory), engine.config))
        try:
            error = reply.result(LOAD_TIMEOUT_S)
        finally:
            with self._lock:
                self._replies.pop(engine.key, None)
        if error is not None:
            name, version = engine.model.name, engine.model.version
            raise ModelLoadError(f"{name} version {version} in the engine process: {error}")

    def unload(self, engine: RemoteEngine) -> None:
        if self._engines.get(engine.key) is engine:
            del self._engines[engine.key]
        try:
            self._write(("unload", engine.key))
        except OSError:
            pass  # the process is gone or restarting: it will not load it again

    def submit(self, engine: RemoteEngine, job) -> None:
        with self._lock:
            if not self.up:
                raise Unavailable("the engine process is restarting; retry")
            self._jobs[job.id] = engine, job
        try:
            self._write(("submit", engine.key, job))
        except OSError as exc:
            with self._lock:
                self._jobs.pop(job.id, None)
            raise Unavailable(f"the engine process is unreachable ({exc}); retry") from None

    def cancel(self, job) -> None:
        with self._lock:
            live = job.id in self._jobs
        if live:
            try:
                self._write(("cancel", job.id))
            except OSError:
                pass  # gone: the job ended with it

    def live(self, engine: RemoteEngine) -> int:
        with self._lock:
            return sum(1 for e, _ in self._jobs.values() if e is engine)


class RemoteEngine:
    """A step model's engine in the engine process, seen as the data plane sees a
    `StepEngine`: submit, cancel, lease, close, counters and occupancy (as of the
    process's latest report)."""

    def __init__(self, link: EngineLink, key: str, model, config, observer=None, stats=None):
        self.link, self.key, self.model, self.config = link, key, model, config
        self.observer = observer or EngineObserver()
        self.stats = stats if stats is not None else EngineStats()
        self.occupied = (0, 0)  # (running, waiting) as of the process's latest message
        self._leases = Leases()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def available(self) -> bool:
        """Whether it takes jobs now (false while the engine process restarts)."""
        return self.link.up and not self._closed

    def lease(self):
        return self._leases.hold()

    def busy(self) -> bool:
        return self._leases.held or self.link.live(self) > 0

    def occupancy(self) -> tuple[int, int]:
        """(jobs in the batch, jobs waiting for rows) at the process's latest message."""
        return self.occupied

    def submit(self, job) -> None:
        if self._closed:
            raise Unavailable(f"{self.model.name}: the server is shutting down")
        self.link.submit(self, job)

    def cancel(self, job) -> None:
        self.link.cancel(job)

    def close(self) -> None:
        self._closed = True
        self.link.unload(self)

    def report(self, stats: EngineStats, observations) -> None:
        """The process's latest counters (copied into the model's own object, which
        metrics and statistics read) and what its metrics observed since the last."""
        for f in dataclasses.fields(EngineStats):
            setattr(self.stats, f.name, getattr(stats, f.name))
        runs, first_tokens, tokens = observations
        for run in runs:
            self.observer.run(*run)
        for seconds in first_tokens:
            self.observer.first_token(seconds)
        if tokens:
            self.observer.tokens(tokens)
