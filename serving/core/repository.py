"""The served model set, loaded from a Triton-style repository.

`<root>/<name>/<version>/model.json` (+ graphs). The highest numeric version of
each name is served. A model that fails to load is logged and skipped; the
others serve.
"""

from __future__ import annotations

import logging
from pathlib import Path

from serving.core.models import MODEL_CARD, Model, load_model
from serving.core.runtime import SessionFactory
from serving.errors import InvalidArgument, ModelLoadError, NotFound

log = logging.getLogger(__name__)


def latest_versions(root: Path) -> dict[str, Path]:
    """{model name: directory of its highest numeric version that has a model card}."""
    found = {}
    for model_dir in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        if model_dir.name.startswith("."):
            continue  # staging directories of an export in progress
        versions = [
            v
            for v in model_dir.iterdir()
            if v.is_dir() and v.name.isdigit() and (v / MODEL_CARD).is_file()
        ]
        if versions:
            found[model_dir.name] = max(versions, key=lambda v: int(v.name))
    return found


class ModelRegistry:
    def __init__(
        self,
        models: dict[str, Model],
        failed: dict[str, str] | None = None,
        sessions: SessionFactory | None = None,
    ):
        self.models = models
        # The server's one session factory: later loads (serving.dataplane.control) use it too, so
        # `--device auto` settles on the CPU once per server, not once per factory.
        self.sessions = sessions
        self.failed = failed or {}  # name -> why it is not served at all
        # (name, version) -> why that version failed to load (an older one may serve)
        self.failed_versions: dict[tuple[str, str], str] = {}

    @classmethod
    def load(
        cls, root: Path, device: str, intra_op_threads: int | None = None, spinning: bool = True
    ) -> ModelRegistry:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"model repository {root} does not exist; run `make models`")
        models, failed, sessions = {}, {}, SessionFactory(device, intra_op_threads, spinning)
        for name, directory in latest_versions(root).items():
            try:
                model = load_model(directory, sessions)
            except ModelLoadError as exc:
                log.error("skipping model %s: %s", name, exc)
                failed[name] = str(exc)
                continue
            models[name] = model
            log.info(
                "loaded %s version %s (%s) on %s", name, model.version, model.kind, model.provider
            )
        return cls(models, failed, sessions)

    def get(self, name: str, kind: str, field: str = "model") -> Model:
        names = ", ".join(sorted(n for n, m in self.models.items() if m.kind == kind))
        if not name:
            raise InvalidArgument(field, f"required; available: {names}")
        model = self.models.get(name)
        if model is None:
            raise NotFound(f"{field}: no model named {name!r}; available {kind}s: {names}")
        if model.kind != kind:
            raise InvalidArgument(
                field, f"{name!r} is a {model.kind}; this RPC needs a {kind}: {names}"
            )
        return model
