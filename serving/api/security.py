"""TLS (optionally mutual) and bearer-token authentication, for the server and clients.

The server: `server_credentials(...)` for `add_secure_port`, and `TokenAuth`, a
`grpc.aio` interceptor that refuses every RPC without `authorization: Bearer <token>`
metadata as UNAUTHENTICATED before its request is even parsed. Health checks and
reflection stay open (load balancers and operators probe them) unless `auth_all`.
The token is compared in constant time.

Clients: `channel(target, ...)` opens a TLS or plain channel that sends the token.
"""

from __future__ import annotations

import hmac
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import grpc

# Services reachable without a token unless --auth-all.
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
MAX_TOKEN_BYTES = 4096


@dataclass(frozen=True)
class SecurityConfig:
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, serve TLS only
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # PEM CA: clients must present a certificate it signed
    auth_token: str | None = field(default=None, repr=False)  # every RPC must carry it
    auth_all: bool = False  # health and reflection need the token too


def read_token(path: Path, flag: str = "--auth-token-file") -> str:
    """The token file's single line; a clear error for a missing, empty or odd file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag}: cannot read {path}: {exc.strerror}") from None
    token = data.decode("utf-8", "replace").strip()
    if not token or len(data) > MAX_TOKEN_BYTES or any(c.isspace() for c in token):
        raise ValueError(
            f"{flag}: {path} must hold one token (no spaces, at most {MAX_TOKEN_BYTES} bytes)"
        )
    return token


def _read(path: Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag}: cannot read {path}: {exc.strerror}") from None


def metrics_ssl_context(config: SecurityConfig) -> ssl.SSLContext | None:
    """With TLS on the gRPC port, `/metrics` is served over HTTPS with the same
    certificate (and, with a client CA, asks for a client certificate it signed), so a
    token (`--auth-all`) never crosses the metrics port in the clear. None: plain HTTP.
    """
    if server_credentials(config) is None:  # also: clear errors naming flag and file
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
        if config.tls_client_ca is not None:
            context.load_verify_locations(config.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"--tls-cert/--tls-key/--tls-client-ca: cannot load them: {exc}") from None
    return context


def server_credentials(config: SecurityConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config, or None to serve plaintext."""
    if config.tls_cert is None and config.tls_key is None:
        if config.tls_client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise ValueError("--tls-cert and --tls-key go together")
    cert, key = _read(config.tls_cert, "--tls-cert"), _read(config.tls_key, "--tls-key")
    client_ca = _read(config.tls_client_ca, "--tls-client-ca")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


class TokenAuth(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, auth_all: bool = False):
        self._expected = f"Bearer {token}".encode()
        self._open = () if auth_all else OPEN_SERVICES

    def allowed(self, method: str, metadata) -> bool:
        if method.startswith(self._open):
            return True
        given = next((v for k, v in metadata or () if k == "authorization"), "")
        if isinstance(given, str):
            given = given.encode("utf-8", "replace")
        return hmac.compare_digest(given, self._expected)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or self.allowed(details.method, details.invocation_metadata):
            return handler
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind that answers UNAUTHENTICATED without parsing the
    request (its bytes are passed through unread)."""
    message = "authorization: missing or wrong bearer token ('authorization: Bearer <token>')"

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # an async generator, as a streaming response needs

    serialize = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, response_serializer=serialize)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, response_serializer=serialize)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, response_serializer=serialize)
    return grpc.stream_stream_rpc_method_handler(streaming, response_serializer=serialize)


# -- clients ----------------------------------------------------------------------------


class _Token(grpc.AuthMetadataPlugin):
    def __init__(self, token: str):
        self._metadata = (("authorization", f"Bearer {token}"),)

    def __call__(self, context, callback):
        callback(self._metadata, None)


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """The token on a plaintext channel (gRPC sends call credentials over TLS only)."""

    def __init__(self, token: str):
        self._token = ("authorization", f"Bearer {token}")

    def _add(self, details):
        metadata = [*(details.metadata or ()), self._token]
        return _Details(
            details.method, details.timeout, metadata, details.credentials,
            details.wait_for_ready, details.compression,
        )  # fmt: skip

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._add(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._add(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._add(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._add(details), requests)


class _Details(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready = credentials, wait_for_ready
        self.compression = compression


def channel(
    target: str,
    ca: Path | None = None,
    token: str | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    options: list | None = None,
) -> grpc.Channel:
    """A channel to the server: TLS when `ca` is given (with a client certificate for
    mutual TLS), sending `token` as a bearer token when given."""
    if ca is None:
        plain = grpc.insecure_channel(target, options=options)
        return grpc.intercept_channel(plain, _TokenInterceptor(token)) if token else plain
    credentials = grpc.ssl_channel_credentials(
        _read(ca, "ca"), _read(key, "key"), _read(cert, "cert")
    )
    if token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.metadata_call_credentials(_Token(token))
        )
    return grpc.secure_channel(target, credentials, options=options)
