"""Per-card rolling features for the fraud model, computed in event time.

The windowed features are **declared** in ``features.yaml`` (next to this file)
for :mod:`rtinfer.features`; the model's training data comes from the offline
path, :func:`offline_features` (:func:`rtinfer.features.backfill_rows` over the
declaration, plus the per-payment columns). Two stages compute them online:

- :class:`CardFeatures`, the demo's stage: the declaration through
  :class:`~rtinfer.features.FeatureStage`, so equal to the offline path by
  construction, with its per-partition state, watermarks, late policy and
  optional durable store;
- :class:`HandCardFeatures`: a hand-vectorised implementation of the same
  definitions, about a third of the engine's cost per payment on this stream (the
  stage alone; the whole demo pipeline runs 1.7 times as fast with it), checked equal
  to :func:`offline_features` on the demo's stream (every float32). It is the
  yardstick of what the general engine costs (``benchmarks/pipeline.py --stages
  hand,engine``), and the stream benchmarks run it on both of their sides.

The features, in :data:`FEATURE_NAMES` order, for a payment at event time ``ts``:

=================  ==================================================================
``amount``         the amount, in the card's billing currency
``log_amount``     ``log1p(amount)``
``foreign``        1 if ``country != card_country``, else 0
``online``         1 if ``channel == "online"``, else 0
``tx_1m``          the card's payments in ``(ts - 60 s, ts]``, this one included
``tx_10m``         the card's payments in ``(ts - 600 s, ts]``, this one included
``amount_10m``     the sum of their amounts (each rounded to the cent, so the sum is exact)
``merchants_10m``  how many distinct merchants they were at
``amount_ratio``   amount / the card's usual amount: an exponentially weighted mean
                   (weight 0.1 on the newest) of its earlier amounts, floored at
                   0.01; 1 for a card's first payment
``gap_s``          seconds since the card's previous payment, at most 3600 (also
                   3600 for its first)
``hour``           hour of day of ``ts``, UTC (0 to 23)
=================  ==================================================================

In :class:`HandCardFeatures`, a payment older than its card's latest (out of
order) is counted as if it had happened at that latest time, so a card's windows
only move forward (:class:`CardFeatures` places it at its own time, as the
declaration says; the two agree on in-order streams such as the demo's).

How :class:`HandCardFeatures` is fast: each card's state is one int64 row of an
array (one trip to memory): the time of its latest payment, its usual amount, how
many payments and cents it has made, and a ring of its :data:`RING` latest payments (time,
cents paid before it, hash of the merchant) from which the windows are read.
The first payment of each card in a batch is computed by numpy for all such
payments at once (``_many``); a card's later payments in the same batch (two
or three in a batch of 256 of the demo stream), and all payments of batches
under 16, where numpy's fixed cost would dominate, are computed one by one in
plain Python (``_one``). Both paths do the same floating-point operations in
the same order, so a payment's features do not depend on the path it took; the
tests check both against a plain reference. Merchant hashes are Python's
``hash`` of the name, only ever compared with each other, so they need not
agree across processes.

A card's state there is bounded (800 bytes, plus its entry in a dict): its
windows see at most its 32 latest earlier payments, far more than any fraud
pattern makes in 10 minutes (beyond that, the counts and sums stop growing at
33 payments). Cards are never forgotten, though: a stream of ever new cards
grows the table (eviction of idle cards is to come).
"""

from __future__ import annotations

import importlib.resources
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ..features import FeatureSet, FeatureStage, backfill_rows, load_definition
from ..types import Batch, Position
from .events import Transaction

__all__ = [
    "FEATURES_VERSION",
    "FEATURE_NAMES",
    "RING",
    "CardFeatures",
    "HandCardFeatures",
    "declared_features",
    "offline_features",
]

#: The model input's columns, in order.
FEATURE_NAMES: tuple[str, ...] = (
    "amount",
    "log_amount",
    "foreign",
    "online",
    "tx_1m",
    "tx_10m",
    "amount_10m",
    "merchants_10m",
    "amount_ratio",
    "gap_s",
    "hour",
)

#: Bump whenever a feature's definition changes (the demo model's cache key includes it).
FEATURES_VERSION = 1

#: How many of a card's latest payments its windows can see.
RING = 32

_WIDTH = len(FEATURE_NAMES)
_SHORT_MS = 60_000
_LONG_MS = 600_000
_ALPHA = 0.1
_MIN_USUAL = 0.01
_MAX_GAP_S = 3600.0
_NEVER = np.iinfo(np.int64).min // 2  # the time of an empty ring slot: outside any window
_MAX_AMOUNT = 1e13  # amounts are summed in int64 cents

# A card's state is one int64 row, so that reading it costs one trip to memory:
_LAST, _USUAL, _SEEN, _PAID = 0, 1, 2, 3  # latest event time (ms); usual amount (float64
# bits); payments so far; cents paid so far. Then three rings, payment q in slot q % RING:
_TIMES = slice(4, 4 + RING)  # its event time
_BEFORE = 4 + RING  # first column of: cents paid before it
_MERCHANTS = slice(4 + 2 * RING, 4 + 3 * RING)  # hash of its merchant
_COLUMNS = 4 + 3 * RING
_MIN_VECTOR = 16  # smaller batches take the per-payment path

IntArray = npt.NDArray[np.int64]


class HandCardFeatures:
    """The same features as :class:`CardFeatures`, hand-vectorised (see the module docstring).

    Reads ``event.data`` of each event in order, updates its card's state and
    sets ``batch.inputs = {"features": float32 array [len(batch), len(FEATURE_NAMES)]}``.
    One instance follows one stream: it is not thread-safe, and payments of one
    card must all reach the same instance (partition by card).
    """

    __slots__ = ("_index", "_state")

    name = "card_features"

    def __init__(self, capacity: int = 1024) -> None:
        """``capacity``: the cards to make room for up front (more grow the table by doubling,
        a copy that stalls the loop for milliseconds once the table is large: size it for
        the cards you expect, at start-up)."""
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1 card, got {capacity}")
        self._index: dict[str, int] = {}  # card -> its row of _state
        self._state: IntArray = self._empty(capacity)

    def __len__(self) -> int:
        """How many cards have state."""
        return len(self._index)

    def __call__(self, batch: Batch) -> Batch:
        batch.inputs = {"features": self._compute([e.data for e in batch.events])}
        return batch

    def transform(self, events: Sequence[Transaction]) -> npt.NDArray[np.float32]:
        """Features of ``events`` in order, continuing from this instance's state.

        The offline path (training): the same code as the stage, so a fresh
        instance fed a stream in one call or in batches gives the same rows.
        """
        return self._compute(events)

    @staticmethod
    def _empty(cards: int) -> IntArray:
        state = np.zeros((cards, _COLUMNS), np.int64)
        state[:, _LAST] = _NEVER
        state[:, _TIMES] = _NEVER
        return state

    def _rows_of(self, events: Sequence[Any]) -> npt.NDArray[np.intp]:
        """Each event's card row, adding rows for new cards."""
        index = self._index
        get = index.get
        rows = [get(tx.card) for tx in events]
        if None in rows:
            for i, row in enumerate(rows):
                if row is None:
                    card = events[i].card
                    row = index.get(card)
                    if row is None:
                        row = index[card] = len(index)
                    rows[i] = row
            if len(index) > len(self._state):
                grown = max(len(index), 2 * len(self._state))
                self._state = np.concatenate([self._state, self._empty(grown - len(self._state))])
        return np.array(rows, np.intp)

    def _compute(self, events: Sequence[Any]) -> npt.NDArray[np.float32]:
        n = len(events)
        out = np.empty((n, _WIDTH), np.float32)
        if n == 0:
            return out
        card = self._rows_of(events)
        amounts = [tx.amount for tx in events]
        amount = np.array(amounts, np.float64)
        out[:, 0] = amount
        log1p = math.log1p  # per element: numpy's SIMD log1p may round lanes differently
        out[:, 1] = [log1p(a) for a in amounts]
        out[:, 2] = [tx.country != tx.card_country for tx in events]
        out[:, 3] = [tx.channel == "online" for tx in events]
        times = [tx.ts for tx in events]
        merchants = [hash(tx.merchant) for tx in events]
        # One numpy pass takes at most one payment per card; the payments of a card
        # already in this batch (a few per batch of 256), and small batches, where
        # numpy's fixed cost would dominate, take the per-payment path. Both compute
        # the same floating-point operations in the same order, so the features do
        # not depend on which path a payment took.
        cards = card.tolist()
        later: list[int] = []
        if n < _MIN_VECTOR:
            later = list(range(n))
        elif len(set(cards)) == n:
            out[:, 4:] = self._many(
                card, np.array(times, np.int64), amount, np.array(merchants, np.int64)
            )
        else:
            known: set[int] = set()
            add = known.add
            for i, c in enumerate(cards):
                if c in known:
                    later.append(i)
                else:
                    add(c)
            first = np.delete(np.arange(n), later)
            out[first, 4:] = self._many(
                card[first],
                np.array(times, np.int64)[first],
                amount[first],
                np.array(merchants, np.int64)[first],
            )
        for i in later:
            self._one(i, cards[i], times[i], amounts[i], merchants[i], out)
        return out

    def _many(
        self, c: npt.NDArray[np.intp], ts: IntArray, a: npt.NDArray[np.float64], m: IntArray
    ) -> npt.NDArray[np.float64]:
        """The stateful features (``tx_1m`` on) of payments on cards ``c``, each at most once.

        Also updates the cards' state.
        """
        state = self._state.take(c, axis=0)  # a copy: written back at the end
        seen = state[:, _SEEN].copy()
        paid = state[:, _PAID].copy()
        last = state[:, _LAST].copy()  # _NEVER for a new card
        usual = state[:, _USUAL].view(np.float64)
        new = seen == 0
        t = np.maximum(ts, last)
        gap = np.minimum((t - last) / 1000.0, _MAX_GAP_S)
        ratio = a / np.maximum(usual, _MIN_USUAL)
        ratio[new] = 1.0

        times = state[:, _TIMES]
        inside = times > (t - _LONG_MS)[:, None]
        n_inside = inside.sum(axis=1)
        # Ring times never decrease with the payment number, so the window is the
        # latest n_inside payments: its sum is a difference of running sums.
        line = np.arange(len(c))
        earlier = paid - state[line, _BEFORE + (seen - n_inside) % RING]
        cents = np.rint(np.minimum(a, _MAX_AMOUNT) * 100.0).astype(np.int64)
        # Distinct merchants: the ring's slots outside the window take this payment's.
        merchants = np.where(inside, state[:, _MERCHANTS], m[:, None])
        merchants.sort(axis=1)
        distinct = (merchants[:, 1:] != merchants[:, :-1]).sum(axis=1) + 1
        full = n_inside == RING
        if full.any():  # no slot was left for this payment's merchant: is it new?
            distinct += full & ~(merchants == m[:, None]).any(axis=1)

        features = np.column_stack(
            [
                (times > (t - _SHORT_MS)[:, None]).sum(axis=1) + 1,
                n_inside + 1,
                (np.where(n_inside > 0, earlier, 0) + cents) / 100.0,
                distinct,
                ratio,
                gap,
                t // 3_600_000 % 24,
            ]
        )
        slot = seen % RING
        state[:, _USUAL] = np.where(new, a, usual + _ALPHA * (a - usual)).view(np.int64)
        state[:, _LAST] = t
        state[:, _SEEN] = seen + 1
        state[:, _PAID] = paid + cents
        state[line, _TIMES.start + slot] = t
        state[line, _BEFORE + slot] = paid
        state[line, _MERCHANTS.start + slot] = m
        self._state[c] = state
        return features

    def _one(self, i: int, c: int, ts: int, a: float, m: int, out: npt.NDArray[np.float32]) -> None:
        """:meth:`_many` for the payment at row ``i`` alone, in plain Python."""
        state = self._state[c]  # a view: written in place
        row = state.tolist()
        seen, paid, last = row[_SEEN], row[_PAID], row[_LAST]
        usual = float(state[_USUAL : _USUAL + 1].view(np.float64)[0])
        t = max(ts, last)
        gap = min((t - last) / 1000.0, _MAX_GAP_S)
        ratio = a / max(usual, _MIN_USUAL) if seen else 1.0
        # Walk the ring from the latest payment back while it is in the window.
        cut_long, cut_short = t - _LONG_MS, t - _SHORT_MS
        inside = recent = 0
        merchants = {m}
        start = _TIMES.start
        for q in range(seen - 1, max(seen - RING, 0) - 1, -1):
            slot = q % RING
            when = row[start + slot]
            if when <= cut_long:
                break
            inside += 1
            recent += when > cut_short
            merchants.add(row[_MERCHANTS.start + slot])
        earlier = paid - row[_BEFORE + (seen - inside) % RING] if inside else 0
        cents = round(min(a, _MAX_AMOUNT) * 100.0)
        out[i, 4:] = (
            recent + 1,
            inside + 1,
            (earlier + cents) / 100.0,
            len(merchants),
            ratio,
            gap,
            t // 3_600_000 % 24,
        )
        slot = seen % RING
        state[_USUAL : _USUAL + 1].view(np.float64)[0] = usual + _ALPHA * (a - usual) if seen else a
        state[_LAST] = t
        state[_SEEN] = seen + 1
        state[_PAID] = paid + cents
        state[start + slot] = t
        state[_BEFORE + slot] = paid
        state[_MERCHANTS.start + slot] = m


# -- the declared features: the offline path, and the stage through the engine ------------


def declared_features() -> FeatureSet:
    """The windowed features of ``features.yaml``, shipped inside the package."""
    text = (importlib.resources.files("rtinfer.demo") / "features.yaml").read_text("utf-8")
    import yaml

    return load_definition(yaml.safe_load(text))


def _assemble(events: Sequence[Any], windowed: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """The model input from the payments and their declared features (``features.yaml``'s
    columns, in float64): the per-payment columns, and ``amount_ratio`` and ``gap_s``
    derived from ``usual_amount`` and ``previous_ts`` as :class:`HandCardFeatures` defines them."""
    n = len(events)
    out = np.empty((n, _WIDTH), np.float32)
    if n == 0:
        return out
    amounts = [tx.amount for tx in events]
    amount = np.array(amounts, np.float64)
    ts = np.array([tx.ts for tx in events], np.int64)
    out[:, 0] = amount
    log1p = math.log1p  # per element, as HandCardFeatures
    out[:, 1] = [log1p(a) for a in amounts]
    out[:, 2] = [tx.country != tx.card_country for tx in events]
    out[:, 3] = [tx.channel == "online" for tx in events]
    out[:, 4:8] = windowed[:, 0:4]
    usual, previous = windowed[:, 4], windowed[:, 5]
    with np.errstate(invalid="ignore"):
        out[:, 8] = np.where(np.isnan(usual), 1.0, amount / np.fmax(usual, _MIN_USUAL))
        out[:, 9] = np.where(
            np.isnan(previous), _MAX_GAP_S, np.minimum((ts - previous) / 1000.0, _MAX_GAP_S)
        )
    out[:, 10] = ts // 3_600_000 % 24
    return out


def offline_features(events: Sequence[Transaction]) -> npt.NDArray[np.float32]:
    """The training data: the features of ``events`` (in arrival order) through the offline
    path, :func:`rtinfer.features.backfill_rows` over :func:`declared_features`."""
    rows = [values for _, _, values in backfill_rows(declared_features(), events)]
    if len(rows) != len(events):
        raise ValueError(f"{len(events) - len(rows)} payments were left out by the backfill")
    windowed = np.array(rows, np.float64).reshape(len(rows), 6)
    return _assemble(events, windowed)


class CardFeatures:
    """The demo's pipeline stage: each :class:`Transaction` to a row of features, the
    windowed ones through :class:`~rtinfer.features.FeatureStage` and ``features.yaml``,
    so the same as :func:`offline_features` by construction.

    Sets ``batch.inputs = {"features": float32 array [len(batch), len(FEATURE_NAMES)]}``.
    State is kept per source partition (payments of one card must share one).
    ``store``: where the feature state is committed with the source's positions, so
    that a restart resumes it (``file://DIR`` or ``redis://...``; see ``docs/features.md``);
    ``None`` keeps it in memory only.
    """

    name = "card_features"

    def __init__(self, store: str | None = None) -> None:
        self.stage = FeatureStage(
            declared_features(), input="windowed", dtype="float64", store=store
        )

    def __call__(self, batch: Batch) -> Batch:
        batch = self.stage(batch)
        inputs = batch.inputs if batch.inputs is not None else {}
        windowed = inputs.pop("windowed")
        inputs["features"] = _assemble([e.data for e in batch.events], windowed)
        batch.inputs = inputs
        return batch

    async def start(self) -> None:
        await self.stage.start()

    async def aclose(self) -> None:
        await self.stage.aclose()

    async def checkpoint(self, positions: Sequence[Position]) -> None:
        await self.stage.checkpoint(positions)
