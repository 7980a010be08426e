"""ONNX Runtime sessions on the execution provider the operator asked for.

ONNX Runtime falls back to the CPU silently when the CUDA provider cannot be
created, so the provider actually in use is read back from the session:
`--device cuda` fails loudly, `auto` prefers CUDA and says what it got.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnxruntime as ort

from serving.errors import DeviceError

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("cpu", "cuda", "auto")
# ONNX Runtime's CPU threads per run, by the graph's kind, unless the operator sets one
# number for all (`--intra-op-threads`). Measured with `python -m bench.ort_threading`
# (docs/BENCHMARKS.md): a step graph runs 64 streams' rows at once, and its pool (one
# thread per core, 0) gives 1.7x the tokens/s of one thread at the same CPU per token;
# a classifier or encoder runs one request's image, where the pool buys 1.08-1.17x the
# requests/s of one client for 1.7-1.9x the CPU per request, and one thread per run
# lets concurrent requests use the cores instead.
INTRA_OP_THREADS = {"step": 0, "prefill": 0, "model": 1, "encoder": 1}


def requested_providers(device: str, available: list[str] | None = None) -> list[str]:
    """The provider list to ask ONNX Runtime for, most preferred first."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    available = ort.get_available_providers() if available is None else available
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        if CUDA not in available:
            raise DeviceError(
                f"--device cuda: this onnxruntime build has no {CUDA} "
                f"(available: {', '.join(available)}); install onnxruntime-gpu"
            )
        return [CUDA, CPU]
    return [CUDA, CPU] if CUDA in available else [CPU]


def check_providers(device: str, path: Path, in_use: list[str]) -> str:
    """Return the primary provider in use; raise when `cuda` was demanded but not granted."""
    primary = in_use[0] if in_use else CPU
    if device == "cuda" and primary != CUDA:
        raise DeviceError(
            f"--device cuda: ONNX Runtime could not create {CUDA} for {path} and fell back to "
            f"{primary}; check the CUDA and cuDNN libraries, or use --device auto/cpu"
        )
    return primary


class SessionFactory:
    """Creates every session of one server on the device the operator chose.

    With `auto`, the first session that cannot get CUDA settles the question: the
    rest go straight to the CPU instead of failing to load CUDA once per graph.
    """

    def __init__(self, device: str, intra_op_threads: int | None = None, spinning: bool = True):
        requested_providers(device)  # validate early
        self.device = device
        self.intra_op_threads = intra_op_threads  # None: by graph (INTRA_OP_THREADS)
        # Whether ONNX Runtime's pool threads spin for work between runs (its default)
        # or sleep: spinning answers a run sooner and burns CPU while idle.
        self.spinning = spinning

    def threads(self, graph: str) -> int:
        """Intra-op threads for a graph of this name ("step", "prefill", "model",
        "encoder"; 0: ONNX Runtime's pool, one thread per physical core)."""
        if self.intra_op_threads is not None:
            return self.intra_op_threads
        return INTRA_OP_THREADS.get(graph, 1)

    def __call__(self, path: Path, graph: str = "model") -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads(graph)
        if not self.spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: a CUDA fallback is reported by us
        providers = requested_providers(self.device)
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        primary = check_providers(self.device, path, session.get_providers())
        if self.device == "auto" and CUDA in providers and primary != CUDA:
            log.warning("device auto: CUDA is unavailable, every model runs on the CPU")
            self.device = "cpu"
        return session
