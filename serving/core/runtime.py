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

    def __init__(self, device: str, intra_op_threads: int = 0):
        requested_providers(device)  # validate early
        self.device = device
        self.intra_op_threads = intra_op_threads

    def __call__(self, path: Path) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.log_severity_level = 3  # errors only: a CUDA fallback is reported by us
        providers = requested_providers(self.device)
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        primary = check_providers(self.device, path, session.get_providers())
        if self.device == "auto" and CUDA in providers and primary != CUDA:
            log.warning("device auto: CUDA is unavailable, every model runs on the CPU")
            self.device = "cpu"
        return session
