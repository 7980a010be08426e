"""The server's configuration: frozen dataclasses, each checked on construction.

`ServerConfig` gathers the parts' own (batching, the continuous-batching engine,
image limits, TLS and tokens); `python -m serving` takes its defaults from these
classes, so each default is written once. A model's config.pbtxt is merged with the
flags' batching once, when the model is loaded (`serving.dataplane.deployments`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from serving.api.limits import MAX_STREAM_INTERVAL_MS
from serving.api.security import SecurityConfig
from serving.batching.dynamic import BatchingConfig
from serving.core.preprocess import ImageLimits
from serving.core.runtime import DEVICES
from serving.dataplane.control import MODES as CONTROL_MODES
from serving.engine import EngineConfig


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server is told, checked on construction. The defaults are the
    command line's (`python -m serving` reads them from here): `host` 0.0.0.0, every
    interface, as a container needs; a library caller or a test that wants loopback
    only says so (`host="127.0.0.1"`)."""

    model_repository: Path = Path("model_repository")
    host: str = "0.0.0.0"
    port: int = 8001  # 0 picks a free port
    device: str = "auto"  # cpu, cuda or auto
    # ONNX Runtime threads per graph run on the CPU; 0: its default, one per physical core
    # (they spin between runs); 1: the run stays on the calling thread, no pool.
    intra_op_threads: int | None = None  # None: by graph kind (core/runtime.py)
    # Whether those threads spin between runs (ONNX Runtime's default) or sleep.
    intra_op_spinning: bool = True
    # Step models' engines in a process of their own (serving/remote/), apart from the
    # gRPC frontend: False runs everything in this one process.
    engine_process: bool = False
    # One of several frontends (`--frontends N`, serving/remote/frontends.py): the address
    # of the engine process its supervisor runs, which it attaches to and shares (its own
    # `engine_process` is implied); its gRPC port is shared with the other frontends
    # (SO_REUSEPORT), and its /metrics is served on loopback for the supervisor to sum.
    # None: a server of its own.
    frontend_of: str | None = None
    engine_key: bytes | None = field(default=None, repr=False)  # that process's authkey
    # Threads for blocking work (decoding images, running graphs); streams hold none.
    max_workers: int = 16
    # Concurrent Generate/Caption/ModelStreamInfer streams, all models together; past it
    # a stream waits for a slot, fairly across clients (serving/api/streams.py)
    max_streams: int = 256
    max_streams_per_client: int = 0  # one client's streams at most; 0: max_streams
    max_waiting_streams: int = 256  # streams waiting for a slot; past it RESOURCE_EXHAUSTED
    # A request header naming the client, set by a trusted proxy (serving/api/clients.py);
    # None: clients are told apart by TLS certificate, else by host
    client_id_header: str | None = None
    # Server-held KServe sequences one client may keep live per model (the model's own
    # cap, 1,024, stays as a backstop)
    max_sequences_per_client: int = 128
    # A stream whose client takes no message for this long (a flow-control window that
    # never reopens) is cancelled and frees its slot; 0 disables the watchdog.
    stream_stall_timeout_s: float = 5.0
    # Coalesced streaming for requests that leave stream_interval_ms unset: tokens within
    # this many ms of the oldest unsent one share a message (0: a message per token).
    stream_interval_ms: int = 20
    max_message_bytes: int = 32 * 1024 * 1024
    request_log: bool = True  # one log line per RPC (serving.api.logs)
    # HTTP/2 connection hygiene: ping idle peers, close connections idle or old (clients
    # reconnect transparently), and bound streams per connection at the transport.
    keepalive_time_ms: int = 60_000
    keepalive_timeout_ms: int = 20_000
    max_connection_idle_ms: int = 5 * 60_000
    max_connection_age_ms: int = 30 * 60_000
    max_connection_age_grace_ms: int = 60_000
    max_concurrent_streams: int = 100  # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS, any RPC
    images: ImageLimits = field(default_factory=ImageLimits)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)  # continuous batching
    security: SecurityConfig = field(default_factory=SecurityConfig)  # TLS, bearer token
    metrics_port: int | None = 8002  # Prometheus /metrics (Triton's port; 0: a free one; None: off)
    model_control_mode: str = "none"  # none, poll or explicit (dataplane/control.py)
    repository_poll_secs: float = 15.0  # poll mode: seconds between repository scans
    # SIGTERM: health turns NOT_SERVING, new requests are still served for the drain
    # delay, then refused while in-flight ones get the grace period (serving/__main__.py)
    drain_delay_s: float = 5.0
    grace_period_s: float = 30.0

    def __post_init__(self):
        if self.max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, not {self.max_streams}")
        if self.max_streams_per_client < 0 or self.stream_stall_timeout_s < 0:
            raise ValueError("max_streams_per_client and stream_stall_timeout_s must be >= 0")
        if self.max_waiting_streams < 0 or self.max_sequences_per_client < 1:
            raise ValueError(
                "max_waiting_streams must be >= 0 and max_sequences_per_client at least 1"
            )
        if not 0 <= self.stream_interval_ms <= MAX_STREAM_INTERVAL_MS:
            raise ValueError(
                f"stream_interval_ms must be 0 to {MAX_STREAM_INTERVAL_MS}, "
                f"not {self.stream_interval_ms}"
            )
        if self.intra_op_threads is not None and self.intra_op_threads < 0:
            raise ValueError(f"intra_op_threads must be 0 or more, not {self.intra_op_threads}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.model_control_mode not in CONTROL_MODES:
            raise ValueError(f"--model-control-mode must be one of {', '.join(CONTROL_MODES)}")
        if self.model_control_mode == "poll" and not self.repository_poll_secs > 0:
            raise ValueError(
                f"--repository-poll-secs must be more than 0, not {self.repository_poll_secs}"
            )
        if self.max_workers < 1 or self.max_message_bytes < 1:
            raise ValueError("max_workers and max_message_bytes must be at least 1")
        if self.max_connection_age_ms < 1000:
            raise ValueError(
                f"max_connection_age must be at least 1 second, not {self.max_connection_age_ms} ms"
            )
        if not (0 <= self.drain_delay_s <= 3600 and 0 <= self.grace_period_s <= 3600):
            raise ValueError("drain_delay_s and grace_period_s must be 0 to 3600 seconds")
