"""`python -m serving --model-repository DIR --port 8001 --device cpu|cuda|auto`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from serving.errors import DeviceError
from serving.runtime import DEVICES
from serving.server import ServerConfig, create_server

log = logging.getLogger("serving")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--max-workers", type=int, default=16, help="threads serving RPCs")
    p.add_argument("--max-streams", type=int, default=12, help="concurrent Generate streams")
    args = p.parse_args(argv)
    config = ServerConfig(
        args.model_repository,
        args.host,
        args.port,
        args.device,
        args.max_workers,
        args.max_streams,
    )
    try:
        server, port = create_server(config)
    except (DeviceError, FileNotFoundError, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    server.start()
    log.info(
        "serving %d model(s) on %s:%d: %s",
        len(server.registry.models),
        args.host,
        port,
        ", ".join(sorted(server.registry.models)) or "none",
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down: NOT_SERVING, letting in-flight RPCs finish (5 s grace)")
    server.health.enter_graceful_shutdown()
    server.stop(grace=5).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
