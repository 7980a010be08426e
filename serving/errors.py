"""One exception hierarchy for the serving core, each class with its gRPC status.

The core raises these without knowing gRPC; `serving.service` maps them to
status codes in one place. Every message names the field and what is allowed.
"""

from __future__ import annotations

import grpc


class ServingError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ModelLoadError(Exception):
    """A model directory could not be turned into a runnable model (not a request error)."""


class DeviceError(RuntimeError):
    """The requested execution provider could not be created."""
