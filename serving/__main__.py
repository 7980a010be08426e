"""`python -m serving --model-repository DIR --port 8001 --device cpu|cuda|auto`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from serving.api.security import SecurityConfig, read_token
from serving.app import create_server
from serving.batching.dynamic import BatchingConfig
from serving.config import CONTROL_MODES, ServerConfig
from serving.core.memory import DEFAULT_MMAP_THRESHOLD, fix_mmap_threshold
from serving.core.preprocess import ImageLimits
from serving.core.runtime import DEVICES
from serving.engine import EngineConfig
from serving.errors import DeviceError
from serving.logformat import FORMATS, configure
from serving.remote import frontends
from serving.remote.frontends import EXIT_NOW, KEY_ENV, SUPERVISOR_ENV

log = logging.getLogger("serving")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be 0 to 3600 seconds, not {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    # Every default is the configuration's own (serving/config.py), written once there.
    d, engine, batching, limits = ServerConfig(), EngineConfig(), BatchingConfig(), ImageLimits()
    p.add_argument("--model-repository", type=Path, default=d.model_repository)
    p.add_argument("--host", default=d.host, help="address to listen on (default: every interface)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--device", choices=DEVICES, default=d.device)
    p.add_argument(
        "--model-control-mode",
        choices=CONTROL_MODES,
        default=d.model_control_mode,
        help="as Triton: none reads the repository once; poll rescans it and serves new "
        "versions; explicit loads and unloads through KServe's repository RPCs",
    )
    p.add_argument(
        "--repository-poll-secs",
        type=float,
        default=d.repository_poll_secs,
        help="poll mode: seconds between repository scans",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=d.metrics_port,
        help="Prometheus metrics at http://HOST:PORT/metrics, https:// with --tls-cert "
        "(Triton's port; 0 turns it off)",
    )
    p.add_argument(
        "--max-workers", type=_positive, default=d.max_workers, help="threads serving RPCs"
    )
    p.add_argument(
        "--max-streams",
        type=_positive,
        default=d.max_streams,
        help="concurrent Generate/Caption streams, all models together",
    )
    p.add_argument(
        "--stream-batch-size",
        type=_positive,
        default=engine.max_batch_size,
        help="streams of one step model run together per iteration (continuous batching; "
        "1 turns batching off)",
    )
    p.add_argument(
        "--prefill-tokens-per-iteration",
        type=_positive,
        default=engine.prefill_tokens_per_iteration,
        help="prompt tokens consumed per iteration at most, so long prompts joining never "
        "stall running streams for long",
    )
    p.add_argument(
        "--bind-state",
        choices=("auto", "on", "off"),
        default="auto",
        help="keep the decode batch's state on the device between steps (ONNX Runtime I/O "
        "binding); auto: on when the model runs on CUDA",
    )
    p.add_argument(
        "--max-streams-per-client",
        "--max-streams-per-connection",  # its old name: a per-connection refusal
        dest="max_streams_per_client",
        type=_count,
        default=d.max_streams_per_client,
        help="streams one client (host, TLS certificate or --client-id-header) may hold; "
        "more wait (default 0: up to --max-streams; fair admission shares slots anyway)",
    )
    p.add_argument(
        "--max-waiting-streams",
        type=_count,
        default=d.max_waiting_streams,
        help="streams that may wait for a slot; past it RESOURCE_EXHAUSTED at once",
    )
    p.add_argument(
        "--client-id-header",
        default=d.client_id_header,
        help="a request header naming the client, set by a trusted proxy in front (e.g. "
        "x-real-ip); without it clients are told apart by TLS certificate, else by host",
    )
    p.add_argument(
        "--max-sequences-per-client",
        type=_positive,
        default=d.max_sequences_per_client,
        help="KServe server-held sequences one client may keep live per model",
    )
    p.add_argument(
        "--stream-interval-ms",
        type=_count,
        default=d.stream_interval_ms,
        help="coalesced streaming for requests that do not set stream_interval_ms: tokens "
        "within this many ms of the oldest unsent one share a message; the first token "
        "and the last message never wait (0: a message per token)",
    )
    p.add_argument(
        "--stream-stall-timeout",
        type=_seconds,
        default=d.stream_stall_timeout_s,
        help="cancel a stream whose client takes no message for this many seconds (0: never)",
    )
    p.add_argument(
        "--max-batch-size",
        type=_positive,
        default=batching.max_batch_size,
        help="Classify requests run together per model, at most this many (default 1: no "
        "dynamic batching)",
    )
    p.add_argument(
        "--max-queue-delay-us",
        type=_count,
        default=batching.max_queue_delay_us,
        help="how long the oldest queued request may wait for a batch to fill (default 0: "
        "batch what queued while the model ran)",
    )
    p.add_argument(
        "--preferred-batch-size",
        type=_positive,
        action="append",
        default=[],
        help="a batch size to run at once when queued (repeat for several)",
    )
    p.add_argument(
        "--max-image-pixels",
        type=_positive,
        default=limits.max_pixels,
        help="largest image accepted, width x height, checked before decoding",
    )
    p.add_argument(
        "--max-concurrent-decodes",
        type=_positive,
        default=limits.max_concurrent_decodes,
        help="images decoded at once; peak decode memory is at most this x 8 bytes x pixels",
    )
    p.add_argument(
        "--drain-delay",
        type=_seconds,
        default=d.drain_delay_s,
        help="seconds between SIGTERM (health turns NOT_SERVING) and refusing new requests "
        "(UNAVAILABLE), so load balancers see the health change first",
    )
    p.add_argument(
        "--grace-period",
        type=_seconds,
        default=d.grace_period_s,
        help="seconds in-flight RPCs get to finish once new requests are refused; streams "
        "still live then end with UNAVAILABLE saying the server is shutting down",
    )
    p.add_argument(
        "--max-connection-age",
        type=_seconds,
        default=d.max_connection_age_ms / 1000,
        help="seconds after which the server asks a client connection to close (HTTP/2 "
        "GOAWAY; its calls get a minute more to finish): clients reconnect and, balancing "
        "by DNS, find replicas added since (default 1800; docs/SCALING.md)",
    )
    p.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text",
        help="every log line, one line per request included, as text or as one JSON object",
    )
    p.add_argument(
        "--intra-op-threads",
        type=_count,
        default=d.intra_op_threads,
        help="ONNX Runtime threads per graph run on the CPU, for every graph: 0 its pool, "
        "one per physical core; 1 each run on its calling thread. Unset: by graph, as "
        "measured (docs/BENCHMARKS.md): the pool for step and prefill graphs (1.7x the "
        "tokens/s at 64 streams), 1 for classifiers and encoders (0.53-0.59x the CPU "
        "per request)",
    )
    p.add_argument(
        "--intra-op-spinning",
        action=argparse.BooleanOptionalAction,
        default=d.intra_op_spinning,
        help="ONNX Runtime's pool threads spin for work between runs (its default; "
        "--no-intra-op-spinning: they sleep, and an idle server burns no CPU)",
    )
    p.add_argument(
        "--engine-process",
        choices=("on", "off"),
        default=None,
        help="on: the step models' continuous-batching engines run in a process of their "
        "own (restarted if it dies), the gRPC frontend in this one; off: one process "
        f"(default: {'on' if d.engine_process else 'off'}; on with --frontends above 1)",
    )
    p.add_argument(
        "--frontends",
        type=_positive,
        default=1,
        help="gRPC server processes sharing the port (SO_REUSEPORT), each with its own "
        "event loop, over one shared engine process; above 1 this process supervises "
        "them (serving/remote/frontends.py). 1: the server runs in this process",
    )
    # A frontend of a supervisor (set by it, not by hand): the engine process's address,
    # and the pipe it says it serves on.
    p.add_argument("--frontend-of", help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument(
        "--request-log",
        action=argparse.BooleanOptionalAction,
        default=d.request_log,
        help="one log line per RPC (health checks aside); --no-request-log leaves startup, "
        "shutdown, reload and error lines only",
    )
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve TLS only")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca",
        type=Path,
        help="PEM CA certificate: clients must present a certificate it signed (mutual TLS)",
    )
    p.add_argument(
        "--auth-token-file",
        type=Path,
        help="a file holding a bearer token every RPC must carry as 'authorization: Bearer "
        "<token>' metadata (UNAUTHENTICATED without it); health and reflection stay open",
    )
    p.add_argument(
        "--auth-all", action="store_true", help="health checks and reflection need the token too"
    )
    p.add_argument(
        "--max-message-bytes",
        type=_positive,
        default=d.max_message_bytes,
        help="largest request or response message; larger requests get RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--mmap-threshold",
        type=int,
        default=DEFAULT_MMAP_THRESHOLD,
        help="bytes from which glibc malloc maps each allocation on its own, so freed images "
        "return to the system (0: keep glibc's adaptive default; see serving/core/memory.py)",
    )
    return p


def _die_with_supervisor() -> None:
    """A frontend gets SIGTERM (and drains) when its supervisor dies, however it died."""
    import ctypes

    supervisor = int(os.environ.pop(SUPERVISOR_ENV, "0"))
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != supervisor:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    configure(args.log_format)
    if args.frontend_of:
        _die_with_supervisor()
    if args.frontends > 1 and args.engine_process == "off":
        p.error("--frontends above 1 share one engine process: --engine-process off is for 1")
    if args.mmap_threshold and not fix_mmap_threshold(args.mmap_threshold):
        log.warning("--mmap-threshold %d was not applied", args.mmap_threshold)
    if args.auth_all and args.auth_token_file is None:
        p.error("--auth-all needs --auth-token-file")
    try:
        token = read_token(args.auth_token_file) if args.auth_token_file else None
    except ValueError as exc:
        log.error("%s", exc)
        return 1
    try:
        config = ServerConfig(
            model_repository=args.model_repository,
            max_message_bytes=args.max_message_bytes,
            metrics_port=args.metrics_port or None,
            request_log=args.request_log,
            model_control_mode=args.model_control_mode,
            repository_poll_secs=args.repository_poll_secs,
            security=SecurityConfig(
                tls_cert=args.tls_cert,
                tls_key=args.tls_key,
                tls_client_ca=args.tls_client_ca,
                auth_token=token,
                auth_all=args.auth_all,
            ),
            host=args.host,
            port=args.port,
            device=args.device,
            intra_op_threads=args.intra_op_threads,
            intra_op_spinning=args.intra_op_spinning,
            engine_process=(
                ServerConfig.engine_process
                if args.engine_process is None
                else args.engine_process == "on"
            ),
            frontend_of=args.frontend_of,
            engine_key=bytes.fromhex(os.environ.pop(KEY_ENV, "")) if args.frontend_of else None,
            max_workers=args.max_workers,
            max_streams=args.max_streams,
            max_streams_per_client=args.max_streams_per_client,
            max_waiting_streams=args.max_waiting_streams,
            client_id_header=args.client_id_header.lower() if args.client_id_header else None,
            max_sequences_per_client=args.max_sequences_per_client,
            stream_stall_timeout_s=args.stream_stall_timeout,
            stream_interval_ms=args.stream_interval_ms,
            drain_delay_s=args.drain_delay,
            grace_period_s=args.grace_period,
            max_connection_age_ms=round(args.max_connection_age * 1000),
            engine=EngineConfig(
                max_batch_size=args.stream_batch_size,
                prefill_tokens_per_iteration=args.prefill_tokens_per_iteration,
                bind_state={"auto": None, "on": True, "off": False}[args.bind_state],
            ),
            batching=BatchingConfig(
                max_batch_size=args.max_batch_size,
                max_queue_delay_us=args.max_queue_delay_us,
                preferred_batch_sizes=tuple(args.preferred_batch_size),
            ),
            images=ImageLimits(
                max_pixels=args.max_image_pixels, max_concurrent_decodes=args.max_concurrent_decodes
            ),
        )
    except ValueError as exc:  # a combination the parser cannot see
        log.error("%s", exc)
        return 1
    if args.frontends > 1:
        return frontends.serve(config, argv, args.frontends)
    try:
        server, port = create_server(config)
    except (DeviceError, FileNotFoundError, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    server.start()
    if args.ready_fd is not None:  # a supervisor's frontend: it waits for this line
        ready = {"port": port, "metrics_port": server.metrics_endpoint.port}
        try:
            os.write(args.ready_fd, json.dumps(ready).encode() + b"\n")
        except BrokenPipeError:  # it gave up on this process, which it kills
            pass
        os.close(args.ready_fd)
    log.info(
        "serving %d model(s) on %s:%d: %s",
        len(server.registry.models),
        args.host,
        port,
        ", ".join(sorted(server.registry.models)) or "none",
    )
    stop = threading.Event()

    def on_signal(signum, _frame):
        if signum == EXIT_NOW or (stop.is_set() and not args.frontend_of):
            # the second signal (a frontend: its supervisor's): no more waiting
            log.warning("second %s: exiting at once", signal.Signals(signum).name)
            logging.shutdown()
            os._exit(128 + signum)
        if stop.is_set():  # a frontend drains once, however many say so
            return
        log.info("%s received", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, *([EXIT_NOW] if args.frontend_of else [])):
        signal.signal(sig, on_signal)
    # The kernel hands a process's signal to any of its threads, under load often a busy
    # gRPC one; Python then runs the handler in the main thread only when that thread next
    # runs bytecode, which a wait with no timeout never does (`docker stop` of a loaded
    # replica waited out its stop_grace_period and was killed). Wait in short slices.
    while not stop.wait(0.25):
        pass
    # Health turns NOT_SERVING while every port still answers, so load balancers and
    # readiness probes see it and move traffic; only then does the server stop accepting.
    log.info(
        "shutting down: NOT_SERVING, still serving for the %g s drain delay, then %g s for "
        "in-flight RPCs (a second signal exits at once)",
        config.drain_delay_s,
        config.grace_period_s,
    )
    server.enter_graceful_shutdown()
    time.sleep(config.drain_delay_s)
    log.info("refusing new requests; %d Generate/Caption stream(s) live", server.streams.live)
    start = time.monotonic()
    server.stop(grace=config.grace_period_s).wait()
    log.info("stopped after %.1f s of grace", time.monotonic() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
