"""API-key authentication: ``Authorization: Bearer <key>``, compared in constant time."""

from __future__ import annotations

import hmac

__all__ = ["BearerAuth"]


class BearerAuth:
    """Checks an ``Authorization`` header against one API key (``None``: no key, all pass)."""

    __slots__ = ("_expected",)

    def __init__(self, api_key: str | None) -> None:
        if api_key is not None and not api_key.strip():
            raise ValueError("the API key is empty; pass a non-empty key or none at all")
        self._expected = None if api_key is None else f"Bearer {api_key}".encode()

    @property
    def enabled(self) -> bool:
        return self._expected is not None

    def allows(self, authorization: bytes | None) -> bool:
        """Whether a request with this ``Authorization`` header value may pass."""
        if self._expected is None:
            return True
        # compare_digest takes the same time whatever the first differing byte is.
        return hmac.compare_digest(authorization or b"", self._expected)
