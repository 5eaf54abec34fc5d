"""A deterministic, realistic synthetic stream of card payments, with labelled fraud.

The stream is built with numpy in bulk from one seeded ``numpy.random.Generator``,
so the same ``(n, seed, fraud_rate, start_ms)`` always gives the same events and
the same bytes.

* **Population** (depends on the seed only): 20,000 cards, each with a home
  country (and its currency), a usual spending level (log-normal, median about
  35), an activity level (log-normal, at most 4 times the median: a card pays
  every 7 minutes on average, the busiest every 2 or so), a taste for online
  shopping and a few favourite merchants; about 5,400 merchants, each with a
  country, a channel (``pos`` or ``online``) and a merchant category code that
  scales its typical amount.
* **Time**: about 50 payments per simulated second on average, following a
  day/night rhythm in UTC (busiest at 14:00, 0.4x at 02:00), from
  :data:`DEFAULT_START_MS` (a Monday, 08:00 UTC) or the given start.
* **Fraud**, about ``fraud_rate`` of the events, uniform in time (so its share
  is higher at night), in three patterns, plus label noise:

  - ``card_testing``: 6 to 20 small payments (0.50 to 4.00) on one card within
    40 to 120 s, mostly online, at one or two merchants, often abroad (40 %);
  - ``foreign_high_value``: one or two payments abroad worth 6 to 30 times the
    card's usual amount;
  - ``merchant_spree``: 5 to 12 payments at different shops within 2 to 7
    minutes, each 1.5 to 4 times the usual amount for the shop's category;
  - ``label_noise`` (8 % of the fraud): ordinary-looking payments reported as
    fraud, so that no model can be perfect.

Normal spending also overlaps the patterns on purpose: travel abroad, cross-border
online shopping, occasional large purchases and heavy users with short gaps.

Bump :data:`GENERATOR_VERSION` whenever the output for a given seed changes: the
demo model's cache key includes it, so the model is retrained to match.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import numpy as np
import numpy.typing as npt

from .events import PATTERNS, Transaction

__all__ = [
    "DEFAULT_START_MS",
    "EVENTS_PER_SECOND",
    "GENERATOR_VERSION",
    "encode_events",
    "generate",
    "write_jsonl",
]

#: Bump whenever the events generated for a given seed change.
GENERATOR_VERSION = 1

#: Average payments per simulated second (before the day/night rhythm).
EVENTS_PER_SECOND = 50.0

#: Default start of event time: 2026-03-02 08:00:00 UTC, in epoch milliseconds.
DEFAULT_START_MS = 1_772_438_400_000

# Card home countries: (ISO 3166 code, ISO 4217 billing currency, share of cards).
_CARD_COUNTRIES = (
    ("US", "USD", 0.34), ("GB", "GBP", 0.12), ("DE", "EUR", 0.12), ("FR", "EUR", 0.10),
    ("ES", "EUR", 0.06), ("IT", "EUR", 0.06), ("NL", "EUR", 0.05), ("CA", "CAD", 0.07),
    ("AU", "AUD", 0.05), ("CH", "CHF", 0.03),
)  # fmt: skip
# Countries with merchants but no cards of ours (destinations of travel and fraud).
_OTHER_COUNTRIES = ("BR", "MX", "TH", "TR", "ZA", "AE", "IN")
_COUNTRIES = tuple(c for c, _, _ in _CARD_COUNTRIES) + _OTHER_COUNTRIES
# Merchant categories: (MCC, typical amount as a multiple of the card's usual, share).
_POS_MCC = (
    (5411, 1.0, 0.25), (5812, 0.9, 0.15), (5814, 0.3, 0.12), (5541, 1.1, 0.10),
    (5912, 0.6, 0.07), (5311, 1.6, 0.06), (5691, 1.4, 0.08), (5732, 3.0, 0.04),
    (5944, 4.5, 0.01), (4121, 0.6, 0.05), (5999, 0.9, 0.05), (7011, 4.0, 0.02),
)  # fmt: skip
_ONLINE_MCC = (
    (5816, 0.25, 0.25), (5311, 1.5, 0.20), (5732, 2.8, 0.12), (5691, 1.3, 0.15),
    (4511, 6.0, 0.05), (7011, 4.0, 0.05), (5999, 0.9, 0.13), (4829, 3.0, 0.05),
)  # fmt: skip
_N_CARDS = 20_000
_POS_PER_COUNTRY_SHARE = 4_000  # pos merchants, shared out by card-country share
_ONLINE_PER_COUNTRY_SHARE = 1_000
_DAY_AMPLITUDE = 0.6  # traffic is 1 +- 0.6 times the average
_PEAK_HOUR = 14.0
# Shares of the fraud budget, in the order of PATTERNS.
_PATTERN_SHARES = (0.40, 0.22, 0.30, 0.08)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class _Population(NamedTuple):
    """Cards and merchants, as parallel arrays indexed by card or merchant number."""

    home: IntArray  # country index of each card
    usual: FloatArray  # median amount of each card
    activity: FloatArray  # probability of each card being the next to pay
    online_share: FloatArray
    fav_pos: IntArray  # [cards, 4] favourite pos merchants
    fav_online: IntArray  # [cards, 2] favourite online merchants
    m_country: IntArray
    m_online: npt.NDArray[np.bool_]
    m_mcc: IntArray
    m_factor: FloatArray
    block_start: IntArray  # [countries, 2]: first merchant of (country, pos|online)
    block_size: IntArray  # [countries, 2]


def _population(rng: np.random.Generator) -> _Population:
    n_home = len(_CARD_COUNTRIES)
    shares = np.array([s for _, _, s in _CARD_COUNTRIES] + [0.01] * len(_OTHER_COUNTRIES))
    m_country, m_online, m_mcc, m_factor = [], [], [], []
    block_start = np.zeros((len(_COUNTRIES), 2), np.int64)
    block_size = np.zeros((len(_COUNTRIES), 2), np.int64)
    start = 0
    for c, share in enumerate(shares):
        for online, (per_share, table) in enumerate(
            ((_POS_PER_COUNTRY_SHARE, _POS_MCC), (_ONLINE_PER_COUNTRY_SHARE, _ONLINE_MCC))
        ):
            size = max(20, round(per_share * share))
            kinds = rng.choice(len(table), size, p=[w for _, _, w in table])
            m_country.append(np.full(size, c))
            m_online.append(np.full(size, bool(online)))
            m_mcc.append(np.array([m for m, _, _ in table])[kinds])
            m_factor.append(np.array([f for _, f, _ in table])[kinds])
            block_start[c, online], block_size[c, online] = start, size
            start += size
    home = rng.choice(n_home, _N_CARDS, p=shares[:n_home] / shares[:n_home].sum())
    activity = np.minimum(rng.lognormal(0.0, 0.5, _N_CARDS), 4.0)

    return _Population(
        home=home,
        usual=rng.lognormal(math.log(35.0), 0.5, _N_CARDS),
        activity=activity / activity.sum(),
        online_share=rng.beta(2.0, 4.0, _N_CARDS),
        fav_pos=_pick(rng, block_start, block_size, home, 0, 4),
        fav_online=_pick(rng, block_start, block_size, home, 1, 2),
        m_country=np.concatenate(m_country),
        m_online=np.concatenate(m_online),
        m_mcc=np.concatenate(m_mcc),
        m_factor=np.concatenate(m_factor),
        block_start=block_start,
        block_size=block_size,
    )


def _pick(
    rng: np.random.Generator,
    block_start: IntArray,
    block_size: IntArray,
    countries: IntArray,
    channel: int,
    k: int = 0,
) -> IntArray:
    """A random merchant of ``channel`` in each of ``countries`` (``k`` of them each, if given)."""
    start, size = block_start[countries, channel], block_size[countries, channel]
    if k:
        start, size = start[:, None], size[:, None]
    u = rng.random((len(countries), k) if k else len(countries))
    picked: IntArray = start + (u * size).astype(np.int64)
    return picked


def _arrival_times(rng: np.random.Generator, n: int, start_ms: int) -> FloatArray:
    """``n`` arrival times in seconds after the start, Poisson with the day/night rhythm."""
    busy = np.cumsum(rng.exponential(1.0 / EVENTS_PER_SECOND, n))  # in "average" seconds
    horizon = (float(busy[-1]) if n else 0.0) / (1.0 - _DAY_AMPLITUDE) + 10.0
    grid = np.linspace(0.0, horizon, int(horizon // 5.0) + 2)
    # The integral of 1 + A cos(2 pi (hour - peak) / 24) from the start to each grid point.
    phase0 = 2.0 * math.pi * ((start_ms / 3_600_000.0 - _PEAK_HOUR) / 24.0)
    omega = 2.0 * math.pi / 86_400.0
    elapsed = grid + _DAY_AMPLITUDE / omega * (np.sin(phase0 + omega * grid) - math.sin(phase0))
    return np.interp(busy, elapsed, grid)


def _incidents(rng: np.random.Generator, budget: int, low: int, high: int) -> IntArray:
    """Sizes of incidents of ``low`` to ``high`` events that add up to ``budget`` exactly."""
    if budget <= 0:
        return np.zeros(0, np.int64)
    sizes = rng.integers(low, high + 1, budget // low + 1)
    total = np.cumsum(sizes)
    k = int(np.searchsorted(total, budget))
    sizes = sizes[: k + 1].copy()
    sizes[-1] -= int(total[k]) - budget
    return sizes


def _other_country(rng: np.random.Generator, home: IntArray) -> IntArray:
    """A random country different from each ``home``."""
    return (home + 1 + rng.integers(0, len(_COUNTRIES) - 1, len(home))) % len(_COUNTRIES)


def generate(
    n: int, *, seed: int = 0, fraud_rate: float = 0.015, start_ms: int | None = None
) -> list[Transaction]:
    """``n`` payments in event-time order, ``round(n * fraud_rate)`` of them labelled fraud.

    Deterministic in its arguments. Event time starts at ``start_ms`` (epoch
    milliseconds; default :data:`DEFAULT_START_MS`) and advances at about
    :data:`EVENTS_PER_SECOND` payments per simulated second. Ids are
    ``"tx-000000000"`` onwards, in stream order.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= fraud_rate <= 0.5:
        raise ValueError(f"fraud_rate must be between 0 and 0.5, got {fraud_rate}")
    start = DEFAULT_START_MS if start_ms is None else start_ms
    rng = np.random.default_rng(seed)
    pop = _population(rng)

    # How many events each pattern gets (largest remainder, adding up to the budget).
    raw = np.array(_PATTERN_SHARES) * round(n * fraud_rate)
    budget = np.floor(raw).astype(np.int64)
    budget[np.argsort(budget - raw)[: round(raw.sum() - budget.sum())]] += 1
    n_normal = n - int(budget[:3].sum())

    # Normal spending.
    t = _arrival_times(rng, n_normal, start)
    span = float(t[-1]) if n_normal else n / EVENTS_PER_SECOND
    card = rng.choice(_N_CARDS, n_normal, p=pop.activity)
    home = pop.home[card]
    online = rng.random(n_normal) < pop.online_share[card]
    u = rng.random(n_normal)
    pos_idx = np.flatnonzero(~pop.m_online)
    onl_idx = np.flatnonzero(pop.m_online)

    def block(countries: IntArray, channel: int) -> IntArray:
        return _pick(rng, pop.block_start, pop.block_size, countries, channel)

    pos = np.where(
        u < 0.6,
        pop.fav_pos[card, rng.integers(0, 4, n_normal)],
        np.where(u < 0.98, block(home, 0), pos_idx[rng.integers(0, len(pos_idx), n_normal)]),
    )
    onl = np.where(
        u < 0.5,
        pop.fav_online[card, rng.integers(0, 2, n_normal)],
        np.where(u < 0.8, block(home, 1), onl_idx[rng.integers(0, len(onl_idx), n_normal)]),
    )
    merchant = np.where(online, onl, pos)
    amount = pop.usual[card] * pop.m_factor[merchant] * rng.lognormal(0.0, 0.5, n_normal)
    code = np.zeros(n_normal, np.int64)
    code[rng.choice(n_normal, min(int(budget[3]), n_normal), replace=False)] = 4
    parts = [(t, card, merchant, amount, code)]

    # Fraud: each pattern is a set of incidents on random cards at uniform random times.
    for pattern, (low, high) in enumerate(((6, 20), (1, 2), (5, 12)), start=1):
        sizes = _incidents(rng, int(budget[pattern - 1]), low, high)
        k = len(sizes)
        inc = np.repeat(np.arange(k), sizes)
        rank = np.arange(len(inc)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        i_card = rng.integers(0, _N_CARDS, k)
        i_home = pop.home[i_card]
        start_at = rng.random(k)  # scaled below, once the incident's duration is known
        f_card = i_card[inc]
        if pattern == 1:  # card testing: one or two merchants, mostly online, small amounts
            abroad = rng.random(k) < 0.4
            country = np.where(abroad, _other_country(rng, i_home), i_home)
            channel = (rng.random(k) < 0.85).astype(np.int64)
            first, second = block(country, 1), block(country, 1)
            first = np.where(channel == 1, first, block(country, 0))
            swap = (rng.random(len(inc)) < 0.25) & (channel[inc] == 1)
            f_merchant = np.where(swap, second[inc], first[inc])
            duration = rng.uniform(40.0, 120.0, k)
            f_amount = np.where(rng.random(len(inc)) < 0.25, 1.0, rng.uniform(0.5, 4.0, len(inc)))
        elif pattern == 2:  # foreign high value: one or two big payments abroad
            country = _other_country(rng, i_home)
            channel = (rng.random(k) < 0.5).astype(np.int64)
            f_merchant = np.where(channel[inc] == 1, block(country[inc], 1), block(country[inc], 0))
            duration = rng.uniform(20.0, 300.0, k)
            f_amount = pop.usual[f_card] * rng.uniform(6.0, 30.0, len(inc))
        else:  # merchant spree: many shops in one country within minutes
            abroad = rng.random(k) < 0.35
            country = np.where(abroad, _other_country(rng, i_home), i_home)
            f_merchant = block(country[inc], 0)
            duration = rng.uniform(120.0, 420.0, k)
            f_amount = (
                pop.usual[f_card] * pop.m_factor[f_merchant] * rng.uniform(1.5, 4.0, len(inc))
            )
        if pattern == 2:  # the second attempt, if any, comes a little later
            offset = rank * duration[inc]
        else:  # stratified: each incident's events in order, spread over its duration
            offset = (rank + rng.random(len(inc))) / sizes[inc] * duration[inc]
        t0 = start_at * np.maximum(span - duration, 0.0)  # each incident ends within the span
        parts.append((t0[inc] + offset, f_card, f_merchant, f_amount, np.full(len(inc), pattern)))

    times, cards, merchants, amounts, codes = (
        np.concatenate(column) for column in zip(*parts, strict=True)
    )
    ts = start + np.round(times * 1000.0).astype(np.int64)
    order = np.argsort(ts, kind="stable")
    return _build(pop, ts[order], cards[order], merchants[order], amounts[order], codes[order])


def _build(
    pop: _Population, ts: IntArray, card: IntArray, merchant: IntArray, amount: Any, code: IntArray
) -> list[Transaction]:
    """Turn the columns into :class:`Transaction` objects, indexing name tables in bulk."""
    names = np.array([f"card-{i:06d}" for i in range(_N_CARDS)], dtype=object)
    m_names = np.array([f"m-{i:05d}" for i in range(len(pop.m_country))], dtype=object)
    countries = np.array(_COUNTRIES, dtype=object)
    currencies = np.array([cur for _, cur, _ in _CARD_COUNTRIES], dtype=object)
    channels = np.array(["pos", "online"], dtype=object)
    patterns = np.array([None, *PATTERNS], dtype=object)
    home = pop.home[card]
    columns = (
        [f"tx-{i:09d}" for i in range(len(ts))],
        ts.tolist(),
        names[card].tolist(),
        m_names[merchant].tolist(),
        pop.m_mcc[merchant].tolist(),
        np.maximum(np.round(amount, 2), 0.5).tolist(),
        currencies[home].tolist(),
        countries[pop.m_country[merchant]].tolist(),
        countries[home].tolist(),
        channels[pop.m_online[merchant].astype(np.int64)].tolist(),
        (code > 0).tolist(),
        patterns[code].tolist(),
    )
    return [Transaction(*row) for row in zip(*columns, strict=True)]


def encode_events(events: list[Transaction]) -> list[bytes]:
    """Each event as one JSON document (bytes), ready to publish."""
    encode = msgspec.json.Encoder().encode
    return [encode(e) for e in events]


def write_jsonl(
    path: str | os.PathLike[str], n: int, seed: int = 0, *, fraud_rate: float = 0.015
) -> int:
    """Write ``n`` generated payments to ``path``, one JSON object a line.

    Returns how many of them are labelled fraud. The whole stream is built in
    memory first (roughly 0.5 KB per event).
    """
    events = generate(n, seed=seed, fraud_rate=fraud_rate)
    encoder = msgspec.json.Encoder()
    with Path(path).open("wb") as f:
        for i in range(0, len(events), 65_536):
            f.write(encoder.encode_lines(events[i : i + 65_536]))
    return sum(e.is_fraud for e in events)
