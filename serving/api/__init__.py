"""The transport: the only package that imports grpc. Servicers translate protobuf to
plain values and back and map errors to status codes; the call wrapper, TLS and
authentication, request logs, per-RPC metrics and stream admission live beside them."""
