"""Run reports: metrics and the per-step history next to each checkpoint."""

from __future__ import annotations

import json
from pathlib import Path


def write_metrics(path: Path, metrics: dict, history: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metrics": metrics, "history": history}, indent=2) + "\n")
