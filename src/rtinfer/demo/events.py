"""The fraud demo's event: one card payment, as it travels on the stream in JSON.

A payment is decoded straight into :class:`Transaction`
(``msgspec.json.decode(raw, type=Transaction)``), which checks the types and a
few bounds (``ts`` and ``amount`` not negative, ``amount`` at most 1e12, ``mcc``
at most 9999, ``channel`` ``"pos"`` or ``"online"``), so a malformed payload is
rejected on its own before it joins a batch.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

__all__ = ["PATTERNS", "Transaction"]

#: The ground-truth ``pattern`` values of generated events, besides ``None`` (normal
#: spending): three fraud scenarios, and ``"label_noise"`` for normal-looking payments
#: that were nevertheless reported as fraud.
PATTERNS: tuple[str, ...] = ("card_testing", "foreign_high_value", "merchant_spree", "label_noise")


class Transaction(msgspec.Struct, gc=False):
    """A card payment.

    ``ts`` is the event time in epoch milliseconds (UTC); ``amount`` is in
    ``currency``, the card's billing currency (cross-border payments arrive
    already converted); ``country`` is where the payment happened (for an
    online payment, the merchant's country) and ``card_country`` the card's
    home country. ``is_fraud`` and ``pattern`` are the ground truth that the
    generator writes for evaluation; the model never sees them.

    ``gc=False``: the fields are all scalars, so the garbage collector need not
    track the thousands of these alive at once in a running pipeline.
    """

    id: str
    ts: Annotated[int, msgspec.Meta(ge=0)]
    card: str
    merchant: str
    mcc: Annotated[int, msgspec.Meta(ge=0, le=9999)]
    amount: Annotated[float, msgspec.Meta(ge=0, le=1e12)]
    currency: str
    country: str
    card_country: str
    channel: Literal["pos", "online"]
    is_fraud: bool = False
    pattern: str | None = None
