"""TLS, mutual TLS and bearer tokens, against real servers on loopback with a throwaway
CA made by openssl for this test session."""

from __future__ import annotations

import http.client
import shutil
import socket
import ssl
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.harness import loopback_config
from serving._proto.inference import grpc_service_pb2 as kpb
from serving._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from serving.api.security import SecurityConfig, channel, read_token
from serving.app import create_server
from serving.client import StepwiseClient

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all
    signed by the CA; and a certificate signed by nobody we trust."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.pem", "-days", "2", "-subj", "/CN=stepwise test CA", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, ext in (("server", ["-extfile", "san.ext"]), ("client", [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", *ext, cwd=d)  # fmt: skip
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "stranger.key",
             "-out", "stranger.pem", "-days", "2", "-subj", "/CN=stranger", cwd=d)  # fmt: skip
    return d


def _serve(repository, metrics_port=None, **security):
    config = SecurityConfig(**security)
    server, port = create_server(
        loopback_config(
            repository, port=0, device="cpu", security=config, metrics_port=metrics_port
        )
    )
    server.start()
    return server, f"localhost:{port}"


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_tls_serves_encrypted_and_refuses_plaintext(repository, pki):
    server, target = _serve(repository, tls_cert=pki / "server.pem", tls_key=pki / "server.key")
    try:
        with StepwiseClient(target, timeout=10, ca=pki / "ca.pem") as client:
            assert "char_lstm" in [m.name for m in client.list_models()]
            assert "".join(client.generate("KING.\n", max_tokens=5, seed=1))
        with StepwiseClient(target, timeout=5) as plain:
            assert _code(plain.list_models) == grpc.StatusCode.UNAVAILABLE
        with StepwiseClient(target, timeout=5, ca=pki / "stranger.pem") as wrong_ca:
            assert _code(wrong_ca.list_models) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)


def test_mutual_tls_needs_a_client_certificate_the_ca_signed(repository, pki):
    server, target = _serve(
        repository,
        tls_cert=pki / "server.pem",
        tls_key=pki / "server.key",
        tls_client_ca=pki / "ca.pem",
    )
    try:
        ca = pki / "ca.pem"
        mine = dict(cert=pki / "client.pem", key=pki / "client.key")
        with StepwiseClient(target, timeout=10, ca=ca, **mine) as client:
            assert client.list_models()
        with StepwiseClient(target, timeout=5, ca=ca) as anonymous:
            assert _code(anonymous.list_models) == grpc.StatusCode.UNAVAILABLE
        stranger = dict(cert=pki / "stranger.pem", key=pki / "stranger.key")
        with StepwiseClient(target, timeout=5, ca=ca, **stranger) as client:
            assert _code(client.list_models) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)


def _health(ch) -> int:
    stub = health_pb2_grpc.HealthStub(ch)
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_a_bearer_token_guards_every_rpc_but_health(repository, pki, tls):
    files = dict(tls_cert=pki / "server.pem", tls_key=pki / "server.key") if tls else {}
    server, target = _serve(repository, auth_token="s3cret-token", **files)
    ca = pki / "ca.pem" if tls else None
    try:
        with StepwiseClient(target, timeout=10, ca=ca, token="s3cret-token") as client:
            assert client.list_models()
            assert "".join(client.generate("KING.\n", max_tokens=5, seed=1))
        for token in (None, "wrong-token", "s3cret-token-and-more"):
            with StepwiseClient(target, timeout=5, ca=ca, token=token) as client:
                assert _code(client.list_models) == grpc.StatusCode.UNAUTHENTICATED
                stream = client.generate_stream("KING.\n", max_tokens=5)
                assert _code(lambda s=stream: list(s)) == grpc.StatusCode.UNAUTHENTICATED
                kserve = kpb_grpc.GRPCInferenceServiceStub(client.channel)
                live = lambda k=kserve: k.ServerLive(kpb.ServerLiveRequest(), timeout=5)  # noqa: E731
                assert _code(live) == grpc.StatusCode.UNAUTHENTICATED
                # health stays open for load balancers and probes
                assert _health(client.channel) == health_pb2.HealthCheckResponse.SERVING
        with channel(target, ca=ca) as ch:  # unparsable bytes are refused, never parsed
            raw = ch.unary_unary("/stepwise.v1.Inference/Classify")
            assert _code(lambda: raw(b"\xff\xff\xff", timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(None)


def test_auth_all_closes_health_too(repository):
    server, target = _serve(repository, auth_token="t0ken", auth_all=True)
    try:
        with channel(target) as ch:
            assert _code(lambda: _health(ch)) == grpc.StatusCode.UNAUTHENTICATED
        with channel(target, token="t0ken") as ch:
            assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(None)


def test_bad_security_settings_are_clear_errors(repository, pki, tmp_path):
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        _serve(repository, tls_cert=pki / "server.pem")
    with pytest.raises(ValueError, match="--tls-client-ca needs"):
        _serve(repository, tls_client_ca=pki / "ca.pem")
    with pytest.raises(ValueError, match="--tls-key: cannot read"):
        _serve(repository, tls_cert=pki / "server.pem", tls_key=tmp_path / "missing.key")
    (tmp_path / "empty").write_text("\n")
    for path in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(ValueError, match="--auth-token-file"):
            read_token(path)
    (tmp_path / "token").write_text("abc\n")
    assert read_token(tmp_path / "token") == "abc"
    proc = subprocess.run(
        [sys.executable, "-m", "serving", "--model-repository", str(repository), "--port", "0",
         "--auth-token-file", str(tmp_path / "empty")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1 and "--auth-token-file" in proc.stderr


def _scrape(port: int, context: ssl.SSLContext | None, token: str | None = None):
    """GET /metrics over HTTPS (with `context`) or plain HTTP: (status, body)."""
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    else:
        conn = http.client.HTTPSConnection("localhost", port, timeout=5, context=context)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        conn.request("GET", "/metrics", headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_metrics_follow_tls_so_the_token_never_crosses_in_the_clear(repository, pki):
    server, _ = _serve(
        repository, metrics_port=0, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
        auth_token="m3trics", auth_all=True,
    )  # fmt: skip
    port = server.metrics_endpoint.port
    trusted = ssl.create_default_context(cafile=pki / "ca.pem")
    try:
        status, body = _scrape(port, trusted, "m3trics")
        assert status == 200 and "nv_inference_request_success{" in body
        assert _scrape(port, trusted)[0] == 401  # TLS alone is not the token
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            _scrape(port, None, "m3trics")  # plain HTTP gets no page
        with pytest.raises(ssl.SSLError):
            _scrape(port, ssl.create_default_context(cafile=pki / "stranger.pem"), "m3trics")
    finally:
        server.stop(None)


def test_metrics_with_mutual_tls_need_a_client_certificate(repository, pki):
    server, _ = _serve(
        repository, metrics_port=0, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
        tls_client_ca=pki / "ca.pem",
    )  # fmt: skip
    port = server.metrics_endpoint.port
    try:
        anonymous = ssl.create_default_context(cafile=pki / "ca.pem")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _scrape(port, anonymous)
        mine = ssl.create_default_context(cafile=pki / "ca.pem")
        mine.load_cert_chain(pki / "client.pem", pki / "client.key")
        assert _scrape(port, mine)[0] == 200
    finally:
        server.stop(None)


def test_a_silent_client_on_the_metrics_port_holds_up_no_scrape(repository, pki):
    """The TLS handshake runs on the request's own thread: a client that connects and
    says nothing stalls only itself."""
    server, _ = _serve(
        repository, metrics_port=0, tls_cert=pki / "server.pem", tls_key=pki / "server.key"
    )
    port = server.metrics_endpoint.port
    try:
        with socket.create_connection(("127.0.0.1", port)):  # silent, handshake pending
            status, body = _scrape(port, ssl.create_default_context(cafile=pki / "ca.pem"))
        assert status == 200 and "nv_inference_request_success{" in body
    finally:
        server.stop(None)


def test_a_missing_certificate_is_named_with_metrics_on_too(repository, pki):
    with pytest.raises(ValueError, match="--tls-cert: cannot read /nonexistent.pem"):
        _serve(repository, metrics_port=0, tls_cert="/nonexistent.pem", tls_key=pki / "server.key")
