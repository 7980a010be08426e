"""Serve one stepwise.v1.Inference servicer until SIGTERM or Ctrl-C (bench servers)."""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures

import grpc

from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc


def add_server_flags(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--max-workers", type=int, default=160, help="threads; one per stream")


def serve(servicer: pb_grpc.InferenceServicer, args: argparse.Namespace, name: str) -> int:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.max_workers))
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    print(f"{name} server on {args.host}:{args.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(None)
    return 0
