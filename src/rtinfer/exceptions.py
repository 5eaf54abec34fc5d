"""Every error rtinfer raises on purpose, in one tree.

::

    RtinferError
    ├── ConfigError            a pipeline file or argument is wrong; names the file and key
    ├── ModelError
    │   ├── ModelLoadError     a model file is missing, unreadable or refused (pickle)
    │   ├── ModelInputError    inputs do not match the model's names, shapes or dtypes
    │   └── FallbackExhausted  every step of a fallback chain failed; carries ``errors``
    ├── DeadlineExceeded       an item's deadline passed before the model ran it
    ├── Overloaded             a queue is full; carries ``retry_after`` seconds
    │   ├── CircuitOpen        a circuit breaker is open; ``retry_after``: until it probes
    │   └── QuotaExceeded      a client used up its quota (HTTP 429); carries ``client``
    ├── MissingDependency      an optional extra is not installed; says what to pip install
    └── Closed                 the component was closed while the call waited

Errors carry what a caller needs to react (``retry_after``, ``key``) as
attributes, and their messages name the value received, the rule broken and
the fix.
"""

from __future__ import annotations

__all__ = [
    "CircuitOpen",
    "Closed",
    "ConfigError",
    "DeadlineExceeded",
    "FallbackExhausted",
    "MissingDependency",
    "ModelError",
    "ModelInputError",
    "ModelLoadError",
    "Overloaded",
    "QuotaExceeded",
    "RtinferError",
]


class RtinferError(Exception):
    """Base of every error rtinfer raises on purpose."""


class ConfigError(RtinferError):
    """A configuration file or value is wrong.

    ``file`` and ``key`` (a dotted path such as ``model.batching.max_size``)
    say where, when known.
    """

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        where = ""
        if file is not None:
            where = f"{file}: "
        if key is not None:
            where += f"at key '{key}': "
        super().__init__(where + message)
        self.file = file
        self.key = key


class ModelError(RtinferError):
    """A model could not be loaded or called."""


class ModelLoadError(ModelError):
    """A model file is missing, unreadable, of an unknown kind, or refused."""


class ModelInputError(ModelError, ValueError):
    """Inputs do not match the model: unknown or missing names, wrong shape or dtype."""


class DeadlineExceeded(RtinferError):
    """The deadline of an item passed before it could be run; it was never batched."""


class Overloaded(RtinferError):
    """A bounded queue is full. Try again after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CircuitOpen(Overloaded):
    """A circuit breaker is open: calls fail at once instead of reaching a failing dependency.

    ``breaker`` names it; ``retry_after`` is the time until it lets a probe through. It
    is an :class:`Overloaded`, so fronts answer it as one (503 with ``Retry-After``) and a
    fallback chain moves on to its next step.
    """

    def __init__(self, message: str, *, breaker: str, retry_after: float = 1.0) -> None:
        super().__init__(message, retry_after=retry_after)
        self.breaker = breaker


class QuotaExceeded(Overloaded):
    """A client has used up its request quota: answer 429 with ``Retry-After``.

    ``client`` names it (an API key id, an address); ``retry_after`` is when its quota
    has room again.
    """

    def __init__(self, message: str, *, client: str, retry_after: float = 1.0) -> None:
        super().__init__(message, retry_after=retry_after)
        self.client = client


class FallbackExhausted(ModelError):
    """Every step of a fallback chain failed (and it has no default decision).

    ``errors`` holds each step's name and error, in order.
    """

    def __init__(self, message: str, *, errors: list[tuple[str, BaseException]]) -> None:
        super().__init__(message)
        self.errors = errors


class MissingDependency(RtinferError, ImportError):
    """An optional dependency is not installed; the message names the install that fixes it."""

    def __init__(self, what: str, extra: str) -> None:
        super().__init__(f"{what} needs an optional dependency: pip install 'rtinfer[{extra}]'")
        self.extra = extra


class Closed(RtinferError):
    """The component was closed while the call was waiting on it."""
