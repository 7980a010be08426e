"""Server assembly: `create_server(config) -> (server, port)`."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # health.aio: the servicer
from grpc_reflection.v1alpha import reflection

from serving import logformat
from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving.api import kserve
from serving.api.calls import Calls
from serving.api.clients import client_identity
from serving.api.logs import RequestLog
from serving.api.rpc_metrics import RpcMetrics
from serving.api.security import TokenAuth, metrics_ssl_context, server_credentials
from serving.api.status import add_to_server
from serving.api.stepwise import InferenceServicer
from serving.api.streams import StreamSlots
from serving.batching.dynamic import DynamicBatcher
from serving.config import ServerConfig
from serving.core.preprocess import ImageDecoder
from serving.core.repository import ModelRegistry
from serving.core.runtime import SessionFactory
from serving.dataplane.control import ModelControl
from serving.dataplane.deployments import Deployments
from serving.dataplane.plane import DataPlane
from serving.engine import StepEngine
from serving.metrics.endpoint import MetricsEndpoint
from serving.metrics.prometheus import Metrics
from serving.metrics.statistics import Statistics
from serving.remote.link import EngineLink
from serving.remote.peers import Peers

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "stepwise.v1.Inference"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"


def _stream_slots(config: ServerConfig) -> StreamSlots:
    return StreamSlots(
        config.max_streams,
        config.max_streams_per_client or config.max_streams,
        config.stream_stall_timeout_s,
        max_waiting=config.max_waiting_streams,
    )


def engine_runtime(config: ServerConfig) -> dict:
    """What an engine process is started with: its sessions' device and threading, and
    the log format (its lines as this process's)."""
    return {
        "device": config.device,
        "intra_op_threads": config.intra_op_threads,
        "spinning": config.intra_op_spinning,
        "log_format": logformat.current(),
    }


class Server:
    """The running server: a `grpc.aio` server on an event loop of its own thread, and
    the parts it serves (the composition root owns them, for operators and tests).

    The same shape as `grpc.Server` where callers need it: `start()`, `stop(grace)`
    returning an event that is set once stopped, `wait_for_termination()`.
    """

    def __init__(self, config: ServerConfig, registry: ModelRegistry):
        self.config, self.registry = config, registry
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-loop", daemon=True)
        self._thread.start()
        # Blocking work (decoding, graph runs, batcher waits) runs here, never on the loop.
        self.workers = futures.ThreadPoolExecutor(config.max_workers, thread_name_prefix="work")
        self.streams = _stream_slots(config)  # Generate and Caption
        # ModelStreamInfer's streams, by the same rules in a pool of their own: a KServe
        # client keeps its stream open while idle, and must not take Generate's slots
        self.kserve_streams = _stream_slots(config)
        identify = functools.partial(client_identity, header=config.client_id_header)
        # Per-model counts and durations of every protocol's inferences (ModelStatistics).
        self.statistics = Statistics()
        self.link = None  # the engine process, when step models run in one
        engines = StepEngine
        if config.engine_process or config.frontend_of:
            self.link = EngineLink(
                engine_runtime(config),
                self.loop,
                on_change=lambda up: self._follow_health(),
                address=config.frontend_of,  # None: start one of its own
                authkey=config.engine_key,
            )
            engines = self.link.engine
        try:
            if self.link is not None:
                self.link.start()
            self._assemble(config, registry, engines, identify)
        except BaseException:
            if self.link is not None:  # no engine process outlives a server that never ran
                self.link.close()
            raise

    def _assemble(self, config: ServerConfig, registry: ModelRegistry, engines, identify):
        """Deployments, metrics, the data plane, the servicers, and the bound port."""
        self.deployments = Deployments(
            registry, self.statistics, config.batching, config.engine,
            observer=lambda name: self.metrics.engine_observer(name), engines=engines,
        )  # fmt: skip
        self.metrics = Metrics(
            registry, self.statistics, self.deployments.engines, self.deployments.batchers
        )
        self.metrics.watch_slots({"generate": self.streams, "kserve": self.kserve_streams})
        for name, model in list(registry.models.items()):
            self.deployments.attach(name, model)
        self.deployments.on_change.append(self._follow_health)
        self.metrics_endpoint = None
        if config.frontend_of:  # for the supervisor, which serves the sum of its frontends',
            # and for the other frontends: our own ModelStatistics counts
            self.metrics_endpoint = MetricsEndpoint(
                self.metrics, "127.0.0.1", 0,
                routes={"/statistics": lambda: self.kserve.local_statistics()},
            )  # fmt: skip
        elif config.metrics_port is not None:
            token = config.security.auth_token if config.security.auth_all else None
            self.metrics_endpoint = MetricsEndpoint(
                self.metrics, config.host, config.metrics_port, token,
                metrics_ssl_context(config.security),
            )  # fmt: skip
        self.plane = DataPlane(
            registry, self.deployments, ImageDecoder(config.images), self.workers,
            self.statistics, config.max_sequences_per_client,
        )  # fmt: skip
        # Loads, reloads and unloads while serving: polled, or through KServe's RPCs.
        self.plane.control = self.control = ModelControl(
            self.deployments, config.model_repository, config.model_control_mode,
            config.repository_poll_secs,
            registry.sessions
            or SessionFactory(config.device, config.intra_op_threads, config.intra_op_spinning),
        )  # fmt: skip
        self.servicer = InferenceServicer(
            self.plane, self.streams, identify, config.stream_interval_ms
        )
        # The KServe V2 protocol; its server-held sequences join the same engines.
        peers = None
        if config.frontend_of:  # the other frontends' statistics count in ours
            own = self.metrics_endpoint.port
            peers = Peers(os.path.dirname(config.frontend_of), own).statistics
        self.kserve = kserve.KServeServicer(self.plane, self.kserve_streams, identify, peers)
        self.health = health.aio.HealthServicer()
        watchers = [RpcMetrics(self.metrics)]
        if config.request_log:
            watchers.insert(0, RequestLog())
        self.calls = Calls(*watchers)
        self._stopped = threading.Event()
        self.port = self._call(self._build())

    @property
    def engines(self) -> dict[str, StepEngine]:
        """Step model name -> its continuous-batching engine (read by operators, tests)."""
        return self.deployments.engines

    @property
    def batchers(self) -> dict[str, DynamicBatcher]:
        """Classifier name -> its dynamic batcher."""
        return self.deployments.batchers

    def _call(self, coroutine, timeout: float | None = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _build(self) -> int:
        c = self.config
        credentials = server_credentials(c.security)  # None: plaintext
        token = c.security.auth_token
        self.server = grpc.aio.server(
            interceptors=[
                # first, so refused calls are logged and counted too; one wrapper for
                # the log, the metrics and ending calls at shutdown
                self.calls,
                *([TokenAuth(token, c.security.auth_all)] if token else []),
            ],
            options=[
                ("grpc.max_receive_message_length", c.max_message_bytes),
                ("grpc.max_send_message_length", c.max_message_bytes),
                # a second server on a busy port fails, not shares; --frontends N share it
                ("grpc.so_reuseport", 1 if c.frontend_of else 0),
                ("grpc.keepalive_time_ms", c.keepalive_time_ms),
                ("grpc.keepalive_timeout_ms", c.keepalive_timeout_ms),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),  # clients' pings
                ("grpc.max_connection_idle_ms", c.max_connection_idle_ms),
                ("grpc.max_connection_age_ms", c.max_connection_age_ms),
                ("grpc.max_connection_age_grace_ms", c.max_connection_age_grace_ms),
                ("grpc.max_concurrent_streams", c.max_concurrent_streams),
            ],
        )
        add_to_server(self.servicer, self.server, pb, "Inference")
        kserve.add(self.kserve, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, kserve.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self.server,
        )
        try:
            address = f"{c.host}:{c.port}"
            if credentials is None:
                port = self.server.add_insecure_port(address)
            else:
                port = self.server.add_secure_port(address, credentials)
        except RuntimeError as exc:  # grpcio raises this when the address is taken or invalid
            raise OSError(f"cannot listen on {c.host}:{c.port}: {exc}") from None
        await self._set_health()
        return port

    async def _set_health(self) -> None:
        """SERVING while any model serves and every step model's engine takes jobs (and
        shutdown has not begun), else NOT_SERVING."""
        if not self.plane.accepting:
            return  # graceful shutdown owns the status now
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.plane.ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME, kserve.SERVICE_NAME):
            await self.health.set(service, status)

    def _follow_health(self) -> None:
        """After a load or unload: health says whether anything serves now."""
        if getattr(self, "server", None) is not None:  # built: the loop serves health
            asyncio.run_coroutine_threadsafe(self._set_health(), self.loop)

    def start(self) -> None:
        self._call(self.server.start())
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.start()
        self.control.start()

    def enter_graceful_shutdown(self) -> None:
        """Health turns NOT_SERVING for every service (and KServe's ServerReady false);
        the server goes on serving."""
        self.plane.accepting = False
        self._call(self.health.enter_graceful_shutdown())

    def stop(self, grace: float | None) -> threading.Event:
        """Refuse new RPCs (clients get UNAVAILABLE), give in-flight ones `grace` seconds
        (None: none), then stop the engines, the pool and the loop. Calls still live
        shortly before the grace period ends, unary or streams, are ended with
        UNAVAILABLE and a message saying why (gRPC would cut them with "Cancelling all
        calls"). Returns an event set once all is stopped."""

        async def stop():
            stopping = asyncio.ensure_future(self.server.stop(grace))
            # Health watchers heard NOT_SERVING when the drain began; their streams
            # never end on their own, and would hold the stop for the whole grace.
            self.calls.end_method(HEALTH_WATCH, "the server is shutting down")
            if grace:  # end the calls with our status before gRPC cancels every one
                margin = min(STREAM_END_MARGIN_S, grace / 10)
                done, _ = await asyncio.wait({stopping}, timeout=grace - margin)
                if not done:
                    ended = self.calls.end(
                        f"the server is shutting down: this call outlived the {grace:g} s "
                        "grace period; retry on another replica"
                    )
                    if ended:
                        log.warning("ended %d call(s) still live after %g s", ended, grace)
            await stopping

        def finish(_):
            try:
                self.control.stop()  # waits for a load in progress: nothing attaches after
                self.deployments.close()
                if self.link is not None:
                    self.link.close()
                self.streams.close()
                self.kserve_streams.close()
                if self.metrics_endpoint is not None:
                    self.metrics_endpoint.stop()
                self.workers.shutdown(wait=False, cancel_futures=True)
            except Exception:  # noqa: BLE001 - stopping must end in "stopped" whatever broke
                log.exception("error while stopping")
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._stopped.set()

        def finish_off_the_loop(done):
            # Stopping waits for things the loop delivers (a model load's reply from the
            # engine process, that process's exit): not on the loop's own thread.
            threading.Thread(target=finish, args=(done,), name="stop", daemon=True).start()

        if self._stopped.is_set():
            return self._stopped
        asyncio.run_coroutine_threadsafe(stop(), self.loop).add_done_callback(finish_off_the_loop)
        return self._stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


# Live calls are ended this long (at most a tenth of the grace period) before gRPC
# cancels every call, so their status reaches the client first.
STREAM_END_MARGIN_S = 0.5


def create_server(
    config: ServerConfig,
    registry: ModelRegistry | None = None,
) -> tuple[Server, int]:
    """Load the models (unless given), bind, and return the server ready to start."""
    registry = registry or ModelRegistry.load(
        config.model_repository, config.device, config.intra_op_threads, config.intra_op_spinning
    )
    server = Server(config, registry)
    return server, server.port
