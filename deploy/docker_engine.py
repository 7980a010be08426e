"""A Docker engine and the deployment's images, for `make compose-test` (issue 18).

    with docker_engine() as engine:             # the engine that runs, or dockerd started here
        images = build_images(engine, log_dir)  # official bases where they can be pulled
        ...                                     # docker-compose with engine.env
        remove_images(engine, images)

An engine that already answers is used as it is. With none, as root, `dockerd` is started
on a socket, data root and exec root of its own under /tmp, and leaving the block stops it
and deletes all three (the images with them) and the docker0 bridge when it made it.
Otherwise `EngineUnavailable` says why, and the caller skips.

The compose file names official images (python:3.11-slim as BASE_IMAGE, nginx:1.27-alpine,
prom/prometheus:v2.42.0). Where none can be pulled, deploy/base_image.sh makes a local base
image and deploy/standins/Dockerfile builds nginx and Prometheus on it from Debian's
packages; `Images` says which were used. Builds use BuildKit, so a target builds only the
stages it needs (the legacy builder would build every stage, the CUDA one included).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import stop
from deploy.topology import ROOT

WHEELS = ROOT / "deploy/wheels"
OFFICIAL_BASE = "python:3.11-slim"
OFFICIAL_NGINX = "nginx:1.27-alpine"
OFFICIAL_PROMETHEUS = "prom/prometheus:v2.42.0"
LOCAL_BASE = "local/python:3.11-bookworm"
STANDIN_NGINX = "stepwise-standin/nginx:1.22"
STANDIN_PROMETHEUS = "stepwise-standin/prometheus:2.42"
TORCH_CPU = "torch==2.13.0+cpu"  # the Makefile's torch, CPU build


class EngineUnavailable(RuntimeError):
    """No Docker engine runs here and none can be started (the reason is the message)."""


@dataclass
class Engine:
    docker: str  # the client binary
    env: dict[str, str]  # os.environ with DOCKER_HOST pointing at the engine
    started: bool  # whether this process started dockerd (and stops it)

    def run(self, *args: str, timeout: float = 120, check: bool = True, **kwargs):
        """`docker ARGS`; output captured as text. CalledProcessError names stderr."""
        proc = subprocess.run(
            [self.docker, *args], env=self.env, capture_output=True, text=True,
            timeout=timeout, **kwargs,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: {proc.stderr.strip()[-2000:]}")
        return proc

    def answers(self) -> bool:
        with suppress(subprocess.TimeoutExpired):
            return self.run("info", timeout=20, check=False).returncode == 0
        return False


def docker_client() -> str | None:
    """$DOCKER, else Debian's client (its BuildKit needs no buildx plugin; a newer client
    earlier on PATH may have no buildx and then cannot build with BuildKit), else PATH's."""
    for candidate in (os.environ.get("DOCKER"), "/usr/bin/docker", shutil.which("docker")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def unavailable_reason() -> str | None:
    """Why no engine can be had here, or None: one answers, or dockerd can be started."""
    client = docker_client()
    if client is None:
        return "no docker client (Debian's docker.io provides one)"
    if Engine(client, dict(os.environ), started=False).answers():
        return None
    if os.geteuid() != 0:
        return "no Docker engine answers, and starting dockerd needs root"
    if shutil.which("dockerd") is None:
        return "no Docker engine answers, and there is no dockerd to start"
    return None


@contextmanager
def docker_engine() -> Iterator[Engine]:
    reason = unavailable_reason()
    if reason:
        raise EngineUnavailable(reason)
    running = Engine(docker_client(), dict(os.environ), started=False)
    if running.answers():
        yield running
        return
    dockerd = shutil.which("dockerd")
    # Short paths: containerd's sockets live under the exec root (108-byte socket paths).
    home = Path(tempfile.mkdtemp(prefix="swd-", dir="/tmp"))
    bridge_before = _has_link("docker0")
    socket = f"unix://{home}/docker.sock"
    engine = Engine(running.docker, {**os.environ, "DOCKER_HOST": socket}, started=True)
    log = (home / "dockerd.log").open("w")
    proc = subprocess.Popen(
        [dockerd, "--host", socket, "--data-root", str(home / "data"),
         "--exec-root", str(home / "exec"), "--pidfile", str(home / "docker.pid")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not engine.answers():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise EngineUnavailable(
                    f"dockerd did not start: {(home / 'dockerd.log').read_text()[-1500:]}"
                )
            time.sleep(0.5)
        print(f"docker_engine: started dockerd (pid {proc.pid}) under {home}", file=sys.stderr)
        yield engine
    finally:
        stop(proc, timeout=30)  # SIGTERM to its group (containerd with it), then SIGKILL
        log.close()
        # Its overlay mounts are gone once it has stopped; anything still mounted (a crash)
        # is unmounted before the folder goes.
        for mount in sorted(_mounts_under(home), reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True, timeout=30)
        shutil.rmtree(home, ignore_errors=True)
        if not bridge_before and _has_link("docker0"):
            subprocess.run(["ip", "link", "delete", "docker0"], capture_output=True, timeout=30)


def _has_link(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts]
    return [p for p in points if p.startswith(f"{path}/")]


@dataclass
class Images:
    base: str  # BASE_IMAGE for the Dockerfiles
    nginx: str
    prometheus: str
    server: str
    loadtest: str
    trainer: str
    resolve: bool  # whether nginx takes `resolve` on an upstream server line
    standins: list[str] = field(default_factory=list)  # what stood in for what, in words
    built: list[str] = field(default_factory=list)  # the project's images, removed after


def pullable(engine: Engine, image: str) -> bool:
    """Whether `image` is here or can be pulled (a registry that cannot be reached answers
    within seconds; a minute at most is allowed)."""
    if engine.run("image", "inspect", image, check=False).returncode == 0:
        return True
    with suppress(subprocess.TimeoutExpired):
        return engine.run("pull", "-q", image, timeout=60, check=False).returncode == 0
    return False


def build(engine: Engine, log_dir: Path, tag: str, *args: str, timeout: float = 1200) -> str:
    """`docker build ARGS -t TAG .` with BuildKit, from the repository root; the build's
    output goes to log_dir/<name>.log."""
    log = log_dir / f"build-{tag.replace('/', '_').replace(':', '_')}.log"
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.run(
            [engine.docker, "build", "--progress", "plain", *args, "-t", tag, "."],
            cwd=ROOT, env={**engine.env, "DOCKER_BUILDKIT": "1"}, stdout=out,
            stderr=subprocess.STDOUT, timeout=timeout,
        )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"docker build {tag} failed:\n{log.read_text()[-3000:]}")
    print(f"docker_engine: built {tag} in {time.monotonic() - start:.0f} s", file=sys.stderr)
    return tag


def base_image(engine: Engine, log_dir: Path) -> tuple[str, list[str]]:
    """The Dockerfiles' BASE_IMAGE: the official one when it can be pulled, else a local
    one from deploy/base_image.sh (debootstrap, the host's CA certificates)."""
    if pullable(engine, OFFICIAL_BASE):
        return OFFICIAL_BASE, []
    if shutil.which("debootstrap") is None:
        raise EngineUnavailable(f"{OFFICIAL_BASE} cannot be pulled and there is no debootstrap")
    with (log_dir / "base_image.log").open("w") as out:
        subprocess.run(
            ["bash", str(ROOT / "deploy/base_image.sh"), LOCAL_BASE], env={
                **engine.env, "DOCKER": engine.docker}, stdout=out, stderr=subprocess.STDOUT,
            timeout=900, check=True,
        )  # fmt: skip
    return LOCAL_BASE, [f"{LOCAL_BASE} (debootstrap, Debian bookworm) for {OFFICIAL_BASE}"]


def torch_wheel() -> tuple[bool, Path | None]:
    """Make sure deploy/wheels/ holds a CPU build of torch, from this machine's pip (with
    its own configuration): (whether it does, the file this call put there, if any)."""
    with tempfile.TemporaryDirectory() as tmp, suppress(subprocess.TimeoutExpired):
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp,
             TORCH_CPU], capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        wheels = list(Path(tmp).glob("torch-*.whl"))
        if proc.returncode == 0 and wheels:
            target = WHEELS / wheels[0].name
            if target.exists():
                return True, None
            shutil.copy(wheels[0], target)
            return True, target
    return False, None


def build_images(engine: Engine, log_dir: Path, tag: str) -> Images:
    """Every image the compose stack runs, the project's own tagged `stepwise-<kind>:TAG`."""
    base, standins = base_image(engine, log_dir)
    images = Images(base, OFFICIAL_NGINX, OFFICIAL_PROMETHEUS, "", "", "", resolve=True,
                    standins=standins)  # fmt: skip
    from_base = ("--build-arg", f"BASE_IMAGE={base}")
    if not pullable(engine, OFFICIAL_NGINX):
        images.nginx = build(engine, log_dir, STANDIN_NGINX, "-f", "deploy/standins/Dockerfile",
                             "--target", "nginx", *from_base)  # fmt: skip
        images.resolve = False
        images.standins.append(
            f"{STANDIN_NGINX} (Debian's nginx 1.22) for {OFFICIAL_NGINX}: no `resolve` on "
            "the upstream's server line, so nginx resolves the replicas once, at start"
        )
    if not pullable(engine, OFFICIAL_PROMETHEUS):
        images.prometheus = build(
            engine, log_dir, STANDIN_PROMETHEUS, "-f", "deploy/standins/Dockerfile",
            "--target", "prometheus", *from_base,
        )  # fmt: skip
        images.standins.append(f"{STANDIN_PROMETHEUS} (Debian's) for {OFFICIAL_PROMETHEUS}")
    have_wheel, added = torch_wheel()
    # With a CPU wheel in deploy/wheels/, PyTorch's CPU index is not asked (it may not be
    # reachable); without one, the Dockerfile's default index is.
    index = ("--build-arg", "TORCH_INDEX_URL=") if have_wheel else ()
    try:
        for kind, args in (("server", ("--target", "serving")),
                           ("loadtest", ("--target", "loadtest")),
                           ("trainer", ("-f", "Dockerfile.train", *index))):  # fmt: skip
            name = build(engine, log_dir, f"stepwise-{kind}:{tag}", *args, *from_base)
            setattr(images, kind, name)
            images.built.append(name)
    except BaseException:
        remove_images(engine, images)  # the ones built before the failure
        raise
    finally:
        if added:
            added.unlink(missing_ok=True)
    return images


def remove_images(engine: Engine, images: Images) -> None:
    """The project's images built for one run (the base and stand-ins stay, as a cache,
    on an engine that was already running; a started one takes them all with it)."""
    if images.built and not engine.started:
        engine.run("image", "rm", "--force", *images.built, check=False, timeout=300)


if __name__ == "__main__":
    # `make compose-test`: print why no engine can be had (nothing when one can).
    print(unavailable_reason() or "")
