"""One exception hierarchy for the serving core, each class with a neutral status name.

The core raises these without knowing gRPC; `serving.api.status` maps the names to
gRPC status codes in one place. Every message names the field and what is allowed,
and lists at most a few offending items (`preview`), so a message never outgrows
the status header that carries it.
"""

from __future__ import annotations

from collections.abc import Sequence


class ServingError(Exception):
    code = "INTERNAL"  # the name of a gRPC status code


class InvalidArgument(ServingError):
    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem

    def __reduce__(self):  # pickled as it was built (errors cross to an engine process)
        return type(self), (self.field, self.problem)


class NotFound(ServingError):
    code = "NOT_FOUND"


class ResourceExhausted(ServingError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(ServingError):
    code = "UNAVAILABLE"


class FailedPrecondition(ServingError):
    code = "FAILED_PRECONDITION"


class Unimplemented(ServingError):
    code = "UNIMPLEMENTED"


class Cancelled(ServingError):
    code = "CANCELLED"


class DeadlineExceeded(ServingError):
    code = "DEADLINE_EXCEEDED"


class LoadFailed(FailedPrecondition):
    """A model version asked for (RepositoryModelLoad) failed to load; an older one
    may still serve."""


class NonFiniteOutput(ServingError):
    """A graph produced NaN or infinity: never sent; INTERNAL unless the caller knows
    the client's input caused it."""


class ModelLoadError(Exception):
    """A model directory could not be turned into a runnable model (not a request error)."""


class CardError(ValueError):
    """A model card (`model.json`) that is not what serving can run: refused when export
    builds it and when serving reads it."""


class DeviceError(RuntimeError):
    """The requested execution provider could not be created."""


def preview(items: str | Sequence, limit: int = 10) -> str:
    """The first `limit` items, repr'd, and how many more: bounded whatever the input.
    A string previews as one repr'd string of its first `limit` characters."""
    if isinstance(items, str):
        shown = repr(items[:limit])
    else:
        shown = ", ".join(repr(x) for x in items[:limit])
    more = len(items) - limit
    return f"{shown} and {more} more" if more > 0 else shown
