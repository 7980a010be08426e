"""Who a call comes from, for the quotas that keep one client from locking others out
(stream slots in `serving.api.streams`, server-held sequences in `serving.api.kserve`).

A client is, in order of preference:
1. the value of a request header the operator trusts (`--client-id-header`, for a
   proxy that sets it, e.g. nginx's `grpc_set_header X-Real-IP $remote_addr`): behind
   a proxy every call comes from the proxy's address, so without it all clients
   behind one proxy share one quota. Of a comma-separated list (X-Forwarded-For) the
   last entry counts, the one the nearest proxy appended; only trust a header that
   the proxy overwrites or appends to, or a client can name itself anything;
2. the subject of its TLS client certificate (`--tls-client-ca`), which it cannot
   forge;
3. its host address: every connection and port of one host is one client.
A bearer token (`--auth-token-file`) is one secret shared by every client, so it
identifies none of them.
"""

from __future__ import annotations


def peer_host(peer: str) -> str:
    """The host part of gRPC's peer string: "ipv4:10.0.0.7:5123" -> "10.0.0.7",
    "ipv6:[::1]:5123" -> "::1"; other forms (unix sockets) as they are."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        return rest.rpartition("]")[0].lstrip("[") or rest
    return peer


def client_identity(context, header: str | None = None) -> str:
    """The quota key of the call whose gRPC servicer context is `context`."""
    if header:
        for key, value in context.invocation_metadata() or ():
            entries = [e.strip() for e in str(value).split(",")] if key == header else []
            if any(entries) and entries[-1]:
                return "header:" + entries[-1][:256]
    auth = context.auth_context() or {}
    for field in ("x509_subject_alternative_name", "x509_common_name"):
        names = auth.get(field)
        if names:
            return "cert:" + b",".join(names).decode("utf-8", "replace")[:256]
    return "host:" + peer_host(context.peer() or "")
