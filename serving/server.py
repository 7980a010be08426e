"""Server assembly: `create_server(config) -> (server, port)`."""

from __future__ import annotations

import dataclasses
import logging
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving.batching import BatchingConfig, DynamicBatcher
from serving.engine import EngineConfig, StepEngine
from serving.models import Classifier, StepDecoder
from serving.preprocess import ImageDecoder, ImageLimits
from serving.repository import ModelRegistry
from serving.service import InferenceServicer, add_to_server
from serving.streams import StreamSlots

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "stepwise.v1.Inference"


@dataclass
class ServerConfig:
    model_repository: Path = Path("model_repository")
    host: str = "127.0.0.1"
    port: int = 8001  # 0 picks a free port
    device: str = "auto"  # cpu, cuda or auto
    # Threads serving RPCs; each stream holds one, waiting on its outbox, until it ends.
    max_workers: int = 80
    max_streams: int = 64  # concurrent Generate/Caption streams; keep it below max_workers
    max_streams_per_connection: int = 8  # so one connection cannot hold every stream
    # A stream whose client takes no message for this long (a flow-control window that
    # never reopens) is cancelled and frees its slot; 0 disables the watchdog.
    stream_stall_timeout_s: float = 5.0
    max_message_bytes: int = 32 * 1024 * 1024
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


def model_batching(model_config, default: BatchingConfig) -> BatchingConfig:
    """A classifier's dynamic batching: its config.pbtxt's `dynamic_batching` block
    (Triton's semantics, up to its `max_batch_size`) when present, else the flags'."""
    if not model_config.HasField("dynamic_batching") or model_config.max_batch_size < 1:
        return default
    block = model_config.dynamic_batching
    return dataclasses.replace(
        default,
        max_batch_size=model_config.max_batch_size,
        max_queue_delay_us=block.max_queue_delay_microseconds,
        preferred_batch_sizes=tuple(block.preferred_batch_size),
    )


def model_engine(model_config, default: EngineConfig) -> EngineConfig:
    """A step model's continuous batch: the flags' size, capped by its config.pbtxt's
    `max_batch_size` when that is set."""
    if model_config.max_batch_size < 1:
        return default
    return dataclasses.replace(
        default, max_batch_size=min(default.max_batch_size, model_config.max_batch_size)
    )


def create_server(
    config: ServerConfig,
    registry: ModelRegistry | None = None,
) -> tuple[grpc.Server, int]:
    """Load the models (unless given), bind, and return the started-ready server."""
    if not 0 < config.max_streams < config.max_workers:
        raise ValueError(
            f"max_streams ({config.max_streams}) must be at least 1 and below max_workers "
            f"({config.max_workers}), so unary calls and health checks always find a thread"
        )
    if config.max_streams_per_connection < 1 or config.stream_stall_timeout_s < 0:
        raise ValueError(
            "max_streams_per_connection must be at least 1 and stream_stall_timeout_s >= 0"
        )
    registry = registry or ModelRegistry.load(config.model_repository, config.device)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="rpc"),
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on a busy port fails, not shares
            ("grpc.keepalive_time_ms", config.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", config.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),  # clients' keepalives
            ("grpc.max_connection_idle_ms", config.max_connection_idle_ms),
            ("grpc.max_connection_age_ms", config.max_connection_age_ms),
            ("grpc.max_connection_age_grace_ms", config.max_connection_age_grace_ms),
            ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        ],
    )
    streams = StreamSlots(
        config.max_streams, config.max_streams_per_connection, config.stream_stall_timeout_s
    )
    batchers = {}
    for name, model in registry.models.items():
        if isinstance(model, Classifier):
            batching = model_batching(model.config, config.batching)
            if batching.max_batch_size > 1:
                batchers[name] = DynamicBatcher(name, model.rows, batching)
    engines = {
        name: StepEngine(model, model_engine(model.config, config.engine))
        for name, model in registry.models.items()
        if isinstance(model, StepDecoder)
    }
    servicer = InferenceServicer(registry, streams, ImageDecoder(config.images), engines, batchers)
    add_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        port = server.add_insecure_port(f"{config.host}:{config.port}")
    except RuntimeError as exc:  # grpcio raises this when the address is taken or invalid
        raise OSError(f"cannot listen on {config.host}:{config.port}: {exc}") from None
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if registry.models
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, status)
    server.registry = registry  # for operators' introspection and tests
    server.health = health_servicer
    server.streams = streams
    server.batchers = batchers
    server.engines = engines
    return server, port
