"""Errors of the HTTP front and the status codes every rtinfer error maps to.

Every error answer is the Open Inference Protocol's ``{"error": "..."}``. The
message is one rtinfer wrote on purpose (what was received, the rule broken,
the fix); an unexpected exception is logged with its traceback and answered
with a plain 500 that names neither the exception nor its text, so a stack
trace or a secret never reaches a client.

=================================  ======  =============================
error                              status  headers
=================================  ======  =============================
malformed body, wrong input        400
an event a pipeline refused        400
missing or wrong API key           401     ``WWW-Authenticate: Bearer``
unknown route, model or version    404
wrong method                       405     ``Allow``
body too large                     413
bad X-Priority                     400
client over quota (QuotaExceeded)  429     ``Retry-After`` (whole seconds)
limiter, queue full, breaker open  503     ``Retry-After`` (whole seconds)
(Overloaded, CircuitOpen)
server draining/closing (Closed)   503     ``Retry-After: 1``
deadline passed                    504
anything else                      500
=================================  ======  =============================
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from ..exceptions import Closed, DeadlineExceeded, ModelInputError, Overloaded, QuotaExceeded
from ..scoring import InvalidEvent
from ..serving import ModelNotFound

__all__ = ["HttpError", "from_exception"]

log = logging.getLogger("rtinfer.http")


class HttpError(Exception):
    """An answer with an error status: ``status``, a message for the client, extra headers."""

    def __init__(
        self, status: int, message: str, *, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def from_exception(exc: BaseException, *, model: str = "") -> HttpError:
    """The HTTP error for an exception raised while answering a request."""
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, ModelNotFound):
        return HttpError(404, str(exc))
    if isinstance(exc, ModelInputError | InvalidEvent):
        return HttpError(400, str(exc))
    if isinstance(exc, Overloaded):
        seconds = max(1, math.ceil(exc.retry_after))
        status = 429 if isinstance(exc, QuotaExceeded) else 503
        return HttpError(status, str(exc), headers={"retry-after": str(seconds)})
    if isinstance(exc, Closed):
        return HttpError(503, f"{exc}; retry", headers={"retry-after": "1"})
    if isinstance(exc, DeadlineExceeded | TimeoutError):
        detail = str(exc) if isinstance(exc, DeadlineExceeded) else ""
        return HttpError(504, detail or "the request's deadline passed before it was answered")
    log.error("request to model %r failed", model, exc_info=exc)
    what = f"model {model!r} failed" if model else "the server failed"
    return HttpError(500, f"{what} on this request; the server log has the details")
