"""Model control, as Triton's `--model-control-mode`: which models serve, changed while
the server runs.

- `none`: the repository is read once at start.
- `poll`: every `--repository-poll-secs` the repository is rescanned. A new highest
  version (or a re-exported one) is loaded beside the serving one; traffic moves to it
  once it is ready, and streams already on the old one finish there. A version that
  fails to load leaves the old one serving and is reported: the log, `ModelReady` false
  for that version, and `RepositoryIndex` with the reason. A model whose directory
  disappeared stops serving; a new directory starts serving.
- `explicit`: the same loads and unloads, asked for through KServe's
  `RepositoryModelLoad` and `RepositoryModelUnload` (every model is loaded at start, as
  Triton with `--load-model=*`).

Export publishes each version by renaming a complete directory into place, so a scan
never sees a half-written model.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from serving.core.model_config import CONFIG_FILE as CONFIG
from serving.core.models import load_model
from serving.core.repository import latest_versions
from serving.core.runtime import SessionFactory
from serving.dataplane.deployments import Deployments
from serving.errors import LoadFailed, ModelLoadError, NotFound, ServingError, Unavailable

log = logging.getLogger(__name__)
MODES = ("none", "poll", "explicit")


class ModelControl:
    """Loads, reloads and unloads the models `deployments` serve, from the repository
    at `root`; `mode` and `poll_secs` as `serving.config.ServerConfig` checked them."""

    def __init__(
        self,
        deployments: Deployments,
        root: Path,
        mode: str = "none",
        poll_secs: float = 15.0,
        sessions: SessionFactory | None = None,
    ):
        self.deployments, self.mode, self.poll_secs = deployments, mode, poll_secs
        self.root = Path(root)
        # the registry's, so `--device auto` settles once per server (one factory)
        self.sessions = sessions or deployments.registry.sessions or SessionFactory("cpu")
        self._lock = threading.Lock()  # one load or unload at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._missing: dict[str, int] = {}  # name -> scans in a row it was not found
        # What each served model was loaded from: name -> (version, card's mtime).
        self.loaded = {
            name: (m.version, _stamp(m.directory))
            for name, m in deployments.registry.models.items()
        }

    @property
    def registry(self):
        return self.deployments.registry

    def load(self, name: str) -> str:
        """Serve the highest version of `name` now in the repository (a no-op when that
        is what serves). Returns the version; raises NotFound or LoadFailed."""
        with self._lock:
            if self._stop.is_set():
                raise Unavailable(f"{name}: the server is shutting down")
            directory = latest_versions(self.root).get(name) if self.root.is_dir() else None
            if directory is None:
                raise NotFound(f"model_name: no model {name!r} in {self.root}")
            stamp = (directory.name, _stamp(directory))
            if self.loaded.get(name) == stamp and name in self.registry.models:
                return directory.name
            try:
                model = load_model(directory, self.sessions)
            except ModelLoadError as exc:
                self.registry.failed_versions[name, directory.name] = str(exc)
                if name not in self.registry.models:
                    self.registry.failed[name] = str(exc)
                serving = self.registry.models.get(name)
                still = f"; version {serving.version} keeps serving" if serving else ""
                log.error("model %s version %s failed to load%s: %s", name, directory.name,
                          still, exc)  # fmt: skip
                self.loaded[name] = stamp  # not retried until the files change again
                raise LoadFailed(f"{name} version {directory.name} failed to load: {exc}") from None
            # The failure records go first: once attached, the version serves, and no
            # RepositoryIndex may call it failed at the same time.
            self.registry.failed.pop(name, None)
            self.registry.failed_versions.pop((name, directory.name), None)
            self.deployments.attach(name, model)
            self.loaded[name] = stamp
            log.info("serving %s version %s (%s) on %s", name, model.version, model.kind,
                     model.provider)  # fmt: skip
            return model.version

    def unload(self, name: str) -> None:
        with self._lock:
            if name not in self.registry.models:
                raise NotFound(f"model_name: {name!r} is not loaded")
            self.deployments.detach(name)
            self.loaded.pop(name, None)
            log.info("unloaded %s; requests already running on it finish", name)

    def poll(self) -> None:
        """One rescan: load what is new or changed, unload what is gone (gone in two
        scans running: re-exporting a version moves the old directory aside for a moment)."""
        found = latest_versions(self.root) if self.root.is_dir() else {}
        for name, directory in found.items():
            self._missing.pop(name, None)
            if self.loaded.get(name) != (directory.name, _stamp(directory)):
                try:
                    self.load(name)
                except ServingError:
                    pass  # logged, and reported by ModelReady and RepositoryIndex
        for name in [n for n in self.registry.models if n not in found]:
            self._missing[name] = self._missing.get(name, 0) + 1
            if self._missing[name] >= 2:
                try:
                    self.unload(name)
                except NotFound:
                    pass
                self._missing.pop(name, None)

    def start(self) -> None:
        if self.mode == "poll" and self._thread is None:
            self._thread = threading.Thread(target=self._poll_loop, name="poll", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """No more polls; returns once a load or unload in progress is done."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(60)
        with self._lock:
            self.mode = "none"  # explicit loads refused from now on

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_secs):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the poller must outlive a bad scan
                log.exception("repository poll failed")


def _stamp(directory: Path) -> tuple:
    """What a version is made of: every file of it and the model's config.pbtxt, by
    name, size and mtime. A re-export, an edited config.pbtxt or a copy still in
    progress all change it (a load that failed on half a copy is tried again)."""
    directory = Path(directory)
    files = [*sorted(p for p in directory.iterdir() if p.is_file()), directory.parent / CONFIG]
    stamp = []
    for path in files:
        try:
            info = path.stat()
        except OSError:
            continue
        stamp.append((path.name, info.st_size, info.st_mtime_ns))
    return tuple(stamp)
