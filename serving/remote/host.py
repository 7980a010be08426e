"""The engine process: the step models' continuous-batching engines, serving the
frontends that connect to it (`python -m serving.remote`, started by
`serving.remote.link.EngineLink`).

Each frontend connection has a thread reading its requests:
    ("load", key, directory, EngineConfig)   -> ("loaded", key, error or None)
    ("unload", key)
    ("submit", key, job)                      a pickled `Sequence` or `BeamSearch`
    ("cancel", job_id)
    ("own",)                                  the first message of the process's owner
    ("stop",)                                 the owner's: close the engines and exit
and, after each engine iteration, gets one message with what every one of its jobs
produced in it: ("deltas", [`wire(job_id, Delta)`, ...], occupancy, report or None): each
engine's jobs running and waiting, and a report (at most every REPORT_INTERVAL_S, and
whenever one of its jobs ended) of its counters and the observations its metrics are
built from.

Frontends share engines: a frontend names a model version by a key of its own, and
every key whose version has the same files and engine configuration (`fingerprint`)
steps in the same engine, so the jobs of several frontends (`--frontends N`) batch
together. An engine closes when no connection holds a key to it. Its counters and
observations go to one connection only, the first that loaded it (its `reporter`), and
its occupancy too: summed over the frontends, every figure counts once.

The process exits when its owner, the server or supervisor that started it (the
connection that said "own"), goes away or says stop: an engine process never outlives
it. Other connections come and go (a frontend restarting, or connecting again after
this process was restarted) without ending it.

Messages to a frontend never block their sender: an engine's thread writes what the
socket takes at once, and a writer thread of the connection sends the rest, so a
frontend that stops reading (its process stopped or wedged) never holds up the engines
that other frontends' streams share. One that takes no
message for `stall_s` (10 s) is cut off: its connection is shut, its jobs cancelled,
and it connects again if it recovers.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection, Listener
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

from serving.core.models import load_model
from serving.core.runtime import SessionFactory
from serving.engine import Delta, EngineObserver, StepEngine
from serving.engine.request import Waker
from serving.errors import ServingError, Unavailable
from serving.logformat import configure

log = logging.getLogger(__name__)

REPORT_INTERVAL_S = 0.1  # counters and gauges reach the frontend at least this often
EARLY = 0.25  # held parts due within this fraction of their interval go with others
STALL_S = 10.0  # a frontend that takes no message for this long is cut off
MAX_QUEUED = 10_000  # messages waiting for one frontend, at most (then it is cut off)


class Recorder(EngineObserver):
    """An engine's observations, kept until the next report carries them to the
    frontend, whose metrics observe them there."""

    def __init__(self):
        self._lock = threading.Lock()
        self.runs: list = []
        self.first_tokens: list = []
        self.gaps: list = []

    def run(self, graph: str, rows: int, seconds: float) -> None:
        with self._lock:
            self.runs.append((graph, rows, seconds))

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.first_tokens.append(seconds)

    def token(self, gap_seconds: float) -> None:
        with self._lock:
            self.gaps.append(gap_seconds)

    def tokens(self, gaps: list[float]) -> None:
        with self._lock:
            self.gaps.extend(gaps)

    def drain(self) -> tuple[list, list, list]:
        with self._lock:
            out = self.runs, self.first_tokens, self.gaps
            self.runs, self.first_tokens, self.gaps = [], [], []
        return out


def fingerprint(directory: str, config) -> str:
    """What makes two loads one engine: the version's files (names, sizes, modification
    times), its model's config.pbtxt, and the engine configuration."""
    version = Path(directory)
    digest = hashlib.sha256(repr(config).encode())
    for path in sorted([*version.rglob("*"), version.parent / "config.pbtxt"]):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if path.is_file():
            digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:20]


class Hosted:
    """One model version's engine in this process, its recorder, and the connections
    holding keys to it (in the order they loaded it: the first reports)."""

    def __init__(self, model, config, fingerprint: str):
        self.recorder = Recorder()
        self.engine = StepEngine(model, config, self.recorder)
        self.fingerprint = fingerprint
        self.users: dict[Outbound, set[str]] = {}  # changed under the host's lock and the user's
        self.reporter: Outbound | None = None  # the first user still holding a key


def _reported(out: Outbound) -> dict[str, Hosted]:
    """key -> engine, for the engines `out` reports: each once, under its latest key."""
    keys: dict[str, Hosted] = {}
    for key, h in reversed(list(out.keys.items())):
        if h.reporter is out and h not in keys.values():
            keys[key] = h
    return keys


def _report(hosted: dict[str, Hosted]) -> dict:
    """key -> (EngineStats copy, (runs, first tokens, token gaps))."""
    report = {}
    for key, h in hosted.items():
        stats = copy.deepcopy(h.engine.stats)  # written by its engine thread meanwhile
        report[key] = (stats, h.recorder.drain())
    return report


def _occupancy(hosted: dict[str, Hosted]) -> dict:
    """key -> (jobs in the batch, jobs waiting): sent with every message (gauges)."""
    return {key: h.engine.occupancy() for key, h in hosted.items()}


class Outbound:
    """One frontend's connection, as the event loop its jobs' outboxes wake (see
    `serving.engine.request.Waker`): within an engine iteration the jobs that produced
    something are gathered and sent in one message when it ends. A coalescing job's
    parts wait here instead, until its interval has passed (a thread of this
    connection's sends them then) or its end comes: one message per interval crosses
    the process boundary, not one per token."""

    def __init__(self, conn: Connection, stall_s: float = STALL_S):
        self.conn = conn
        self.stall_s = stall_s
        # Writes go through a socket of the connection's own (a duplicate: `send` with
        # MSG_DONTWAIT never blocks, while its reader keeps the blocking one).
        self._socket = socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
        self._outgoing: deque = deque()  # framed bytes for the writer, in order
        self._writing = threading.Condition(threading.Lock())  # never taken with _lock held
        # by the writer: only bytes the socket would not take at once wait on a frontend
        self._sending_since = 0.0  # when the writer's current bytes began (0: idle)
        self.cut_off = False  # it stopped reading: nothing more is queued
        self._finished = False  # the writer ended (closed, cut off, or the frontend gone)
        self.keys: dict[str, Hosted] = {}  # this frontend's keys, in load order
        self._lock = threading.Lock()
        self._due = threading.Condition(self._lock)  # a held job to send, or closed
        self._buffer: list = []
        self._held: dict[int, tuple[float, Taker]] = {}  # job id -> (send at, its taker)
        self._ended = False  # a job ended since the last report
        self._reported = 0.0
        self._seen: tuple | None = None  # gauges and iterations at the last idle report
        self.closed = False
        self.owner = False  # said "own": the process ends with this connection
        self.jobs: dict[int, tuple[str, object]] = {}  # frontend's job id -> (key, the job)
        threading.Thread(target=self._send_held, name="held", daemon=True).start()
        threading.Thread(target=self._write, name="write", daemon=True).start()

    def call_soon_threadsafe(self, callback, takers) -> None:
        """Take what the woken jobs produced (`callback(takers)`) and send it at once."""
        with self._lock:
            callback(takers)
            self._flush()

    def send(self, job_id: int, delta) -> None:
        with self._lock:
            self._buffer.append(wire(job_id, delta))
            self._ended |= delta.finished
            self._flush()

    def hold(self, taker: Taker, until: float) -> None:
        """Send what `taker`'s job produced at `until` (time.monotonic()); under the lock."""
        self._held[taker.job_id] = until, taker
        self._due.notify()

    def _send_held(self) -> None:
        """Send held parts when due; when some are, those due within the next quarter of
        their interval go along (early, never late), so many streams share a few
        messages per interval instead of one message each."""
        with self._lock:
            while not self.closed:
                now = time.monotonic()
                if any(until <= now for until, _ in self._held.values()):
                    for until, taker in list(self._held.values()):
                        if until - taker.slack_s <= now:
                            taker.take()
                    self._flush()
                soonest = min((until for until, _ in self._held.values()), default=None)
                self._due.wait(None if soonest is None else soonest - time.monotonic())

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._due.notify()
        with self._writing:
            self._outgoing.clear()
            if self._sending_since:  # the writer is stuck on a frontend that may never read
                self._shut()
            self._writing.notify()

    def _flush(self) -> None:
        if not self._buffer:
            return
        now = time.monotonic()
        report = None
        reported = _reported(self)
        if self._ended or now - self._reported >= REPORT_INTERVAL_S:
            report, self._reported, self._ended = _report(reported), now, False
        message = ("deltas", self._buffer, _occupancy(reported), report)
        self._buffer = []
        self._send(message)

    def report(self) -> None:
        """Counters and gauges alone, while nothing else is sent, so they stay fresh;
        none while nothing changed (an idle server stays quiet)."""
        with self._lock:
            if time.monotonic() - self._reported < REPORT_INTERVAL_S or self._buffer:
                return
            reported = _reported(self)
            occupancy = _occupancy(reported)
            seen = occupancy, {k: h.engine.stats.iterations for k, h in reported.items()}
            if seen == self._seen:
                return
            self._seen, self._reported = seen, time.monotonic()
            self._send(("deltas", [], occupancy, _report(reported)))

    def send_message(self, message: tuple) -> None:
        """Any other message (a load's reply), whole, between the deltas."""
        with self._lock:
            self._send(message)

    def _send(self, message: tuple) -> None:
        """Send `message` as `Connection.send` frames it, as far as the socket takes it
        now; the rest goes to the writer. Whoever sends, an engine's thread above all,
        never waits on the frontend."""
        data = _framed(ForkingPickler.dumps(message))
        with self._writing:
            if self.cut_off or self.closed or self._finished or self._stalled():
                return
            if not self._outgoing and not self._sending_since:  # the writer is idle
                try:
                    data = data[self._socket.send(data, socket.MSG_DONTWAIT) :]
                except BlockingIOError:  # full: all of it waits
                    pass
                except OSError:  # the frontend is gone; its reader thread ends
                    return
                if not data:
                    return
            self._outgoing.append(data)
            self._writing.notify()

    def watch(self) -> None:
        """Cut the frontend off if it has taken no message for `stall_s` (its
        connection's reader calls this while the frontend sends nothing, so a frontend
        is cut off even when nothing more is sent to it)."""
        with self._writing:
            if not (self.cut_off or self.closed):
                self._stalled()

    def _stalled(self) -> bool:
        """Under `_writing`: whether the writer has been stuck in one message past
        `stall_s`, or too many wait; if so, cut the frontend off."""
        writing = self._sending_since
        if (writing and time.monotonic() - writing > self.stall_s) or (
            len(self._outgoing) >= MAX_QUEUED
        ):
            self._cut_off()
            return True
        return False

    def _write(self) -> None:
        """The connection's writer: sends what the socket would not take at once, in
        order, waiting for the frontend to read, until the connection closes."""
        while True:
            with self._writing:
                while not self._outgoing and not (self.closed or self.cut_off):
                    self._writing.wait()
                if not self._outgoing:
                    break
                data = self._outgoing.popleft()
                self._sending_since = time.monotonic()
            try:
                self._socket.sendall(data)
            except OSError:  # the frontend is gone; its reader thread ends
                break
            finally:
                with self._writing:
                    self._sending_since = 0.0
        with self._writing:  # not while a direct send may use it
            self._finished = True  # nothing more goes out on this connection
            self._outgoing.clear()
            self._socket.close()  # the duplicate: the connection itself is its reader's

    def _cut_off(self) -> None:
        """Under `_writing`: the frontend stopped reading. Drop what waits for it and
        shut its connection: the writer's blocked send fails, and the connection's reader
        sees the end and cancels its jobs."""
        self.cut_off = True
        self._outgoing.clear()
        log.warning(
            "engine process: a frontend took no message for %g s; its connection is closed "
            "and its streams end",
            self.stall_s,
        )
        self._shut()

    def _shut(self) -> None:
        """Shut the connection both ways: a blocked send fails, the reader sees its end."""
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:  # closed already
            pass


def _framed(payload: bytes) -> bytes:
    """`payload` with the length header `multiprocessing.connection.Connection` reads."""
    if len(payload) > 0x7FFFFFFF:
        return struct.pack("!i", -1) + struct.pack("!Q", len(payload)) + payload
    return struct.pack("!i", len(payload)) + payload


class Taker:
    """Takes a job's output for its frontend when its outbox wakes it (the `event` of a
    `Waker` whose loop is an `Outbound`), under the `Outbound`'s lock. With the job's
    `interval_s`, parts after its first wait until that long after the oldest of them,
    or its end: the coalescing its reader in the frontend would do, done here."""

    __slots__ = ("job_id", "outbox", "out", "interval_s", "slack_s", "started")

    def __init__(self, job_id: int, job, out: Outbound):
        self.job_id, self.outbox, self.out = job_id, job.outbox, out
        self.interval_s = getattr(job, "interval_s", 0.0)
        self.slack_s = self.interval_s * EARLY  # how early its held parts may go
        self.started = False  # a part went out: the next may wait
        self.outbox.on_ready = Waker(out, self, batch=True)
        self.outbox.take_or_arm()  # armed: its first put wakes this taker

    def set(self) -> None:
        """The outbox turned ready (or, held, its end came)."""
        if self.interval_s > 0 and self.started and not self.outbox.ready_or_arm(end_only=True):
            self.out.hold(self, self.outbox.ready_since + self.interval_s)  # its end wakes it
            return
        self.take()

    def take(self) -> None:
        self.out._held.pop(self.job_id, None)
        while True:  # re-armed once empty
            since = self.outbox.ready_since
            delta = self.outbox.take_or_arm()
            if delta is None:
                return
            self.started |= bool(delta.tokens or delta.pieces)
            self.out._buffer.append(wire(self.job_id, delta, since))
            if delta.finished:
                self.out._ended = True
                self.out.jobs.pop(self.job_id, None)
                return


def wire(job_id: int, delta: Delta, since: float = 0.0) -> tuple:
    """A delta as sent: (job_id, pieces, tokens, logprobs, since) while its stream runs
    (plain lists pickle ~9x faster than the dataclass; `since`: when its oldest part was
    produced, so the frontend's reader does not hold it again), (job_id, delta) for its
    end or a result."""
    if delta.finished or delta.logits is not None or delta.beams is not None:
        return job_id, delta
    return job_id, delta.pieces, delta.tokens, delta.logprobs, since


def _wire_error(exc: BaseException) -> ServingError:
    """An error that unpickles in the frontend as what it is, or INTERNAL with its text."""
    if isinstance(exc, ServingError):
        return exc
    return ServingError(f"{type(exc).__name__}: {exc}"[:400])


class EngineHost:
    def __init__(self, address: str, authkey: bytes, sessions: SessionFactory):
        self.sessions = sessions
        self.shared: dict[str, Hosted] = {}  # fingerprint -> its engine
        self._lock = threading.Lock()  # shared, and every connection's keys
        self._loading = threading.Lock()  # one load at a time: a version loads once
        self.listener = Listener(address, family="AF_UNIX", authkey=authkey)
        self.stopped = threading.Event()

    def serve(self) -> None:
        """Accept frontends (on a thread of its own) until the owner, the server or
        supervisor that started this process, goes away or says stop; then close the
        engines."""
        threading.Thread(target=self._accept, name="accept", daemon=True).start()
        self.stopped.wait()
        for hosted in list(self.shared.values()):
            hosted.engine.close()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn = self.listener.accept()
            except Exception:  # noqa: BLE001 - a failed handshake ends that connection only
                log.warning("engine process: a connection failed", exc_info=True)
                continue
            threading.Thread(target=self._serve, args=(conn,), name="frontend", daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        out = Outbound(conn)
        try:
            while True:
                if not conn.poll(REPORT_INTERVAL_S):
                    out.report()
                    out.watch()
                    continue
                self._handle(out, conn.recv())
        except (EOFError, OSError):
            pass
        except Exception:  # noqa: BLE001 - said, not silent: the server sees it as a crash
            log.exception("engine process: serving a frontend failed")
        finally:
            out.close()
            conn.close()
            for key, job in list(out.jobs.values()):  # its streams end with the connection
                hosted = out.keys.get(key)
                if hosted is not None:
                    hosted.engine.cancel(job)
            if out.owner:
                self.stopped.set()
            else:  # a frontend of several went away: the others keep what they hold
                for key in list(out.keys):
                    self._unload(out, key)

    def _handle(self, out: Outbound, message: tuple) -> None:
        op = message[0]
        if op == "stop":
            self.stopped.set()
        elif op == "own":
            out.owner = True
        elif op == "submit":
            _, key, job = message
            frontend_id = job.id
            out.jobs[frontend_id] = key, job
            Taker(frontend_id, job, out)
            hosted = out.keys.get(key)
            try:
                if hosted is None:
                    raise Unavailable(f"{key} is not loaded in the engine process; retry")
                hosted.engine.submit(job)
            except Exception as exc:  # noqa: BLE001 - a refused job ends with its error
                out.jobs.pop(frontend_id, None)
                job.outbox.on_ready = None
                error = _wire_error(exc)
                out.send(frontend_id, Delta(finished=True, finish_reason="error", error=error))
        elif op == "cancel":
            key, job = out.jobs.get(message[1], (None, None))
            hosted = out.keys.get(key)
            if hosted is not None:
                hosted.engine.cancel(job)
        elif op == "load":  # on a thread of its own: streams go on meanwhile
            threading.Thread(target=self._load, args=(out, *message[1:]), daemon=True).start()
        elif op == "unload":
            self._unload(out, message[1])

    def _load(self, out: Outbound, key: str, directory: str, config) -> None:
        """Give `out` model version `key`, loading it unless an engine with the same
        fingerprint serves already, and say so: ("loaded", key, None or why not)."""
        try:
            with self._loading:
                fp = fingerprint(directory, config)
                hosted = self.shared.get(fp)
                if hosted is None:
                    model = load_model(Path(directory), self.sessions)
                    hosted = Hosted(model, config, fp)
                with self._lock, out._lock:
                    gone = out.closed  # went away meanwhile: nothing of it may stay
                    if not gone:
                        self.shared[fp] = hosted
                        hosted.users.setdefault(out, set()).add(key)
                        hosted.reporter = hosted.reporter or out
                        out.keys[key] = hosted
                if gone:
                    if not hosted.users:  # loaded for it alone
                        hosted.engine.close()
                    return
            out.send_message(("loaded", key, None))
        except Exception as exc:  # noqa: BLE001 - the frontend reports it
            log.exception("engine process: loading %s failed", key)
            out.send_message(("loaded", key, f"{type(exc).__name__}: {exc}"))

    def _unload(self, out: Outbound, key: str) -> None:
        """`out` lets go of `key`; the engine closes once no connection holds it."""
        with self._lock, out._lock:
            hosted = out.keys.pop(key, None)
            if hosted is None:
                return
            keys = hosted.users.get(out, set())
            keys.discard(key)
            if not keys:
                hosted.users.pop(out, None)
                if hosted.reporter is out:  # the next user reports from now on
                    hosted.reporter = next(iter(hosted.users), None)
            last = not hosted.users
            if last:
                self.shared.pop(hosted.fingerprint, None)
        if last:
            hosted.engine.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="stepwise's engine process (started by the server)")
    p.add_argument("--address", required=True, help="the Unix socket to listen on")
    p.add_argument(
        "--runtime", default="{}", help="JSON: device, intra_op_threads, spinning, log_format"
    )
    args = p.parse_args(argv)
    # Its life follows its server's: a Ctrl-C or SIGTERM to the process group is the
    # server's to act on (it drains, then says stop), not this process's.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    runtime = json.loads(args.runtime)
    configure(runtime.get("log_format", "text"))  # as its server writes them
    authkey = bytes.fromhex(os.environ.pop("STEPWISE_ENGINE_KEY", ""))
    sessions = SessionFactory(
        runtime.get("device", "cpu"), runtime.get("intra_op_threads"), runtime.get("spinning", True)
    )
    host = EngineHost(args.address, authkey, sessions)
    log.info("engine process %d listening on %s", os.getpid(), args.address)
    host.serve()
    log.info("engine process stopping: its server asked, or went away")
    sys.exit(0)
