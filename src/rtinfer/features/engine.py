"""The one code path that computes feature values, online and offline.

:class:`Engine` is built once from a :class:`~.definition.FeatureSet`; its
:meth:`Engine.apply_columns` takes a batch as columns (keys, times, one list per
field read) in arrival order and returns each event's feature values, updating
a :class:`Partition`'s state (:meth:`Engine.apply` takes the same as rows
``(key, time, value, ...)``). The online stage and the backfill both call it,
event by event in the same order, so a value never depends on how the stream
was cut into batches.

A partition's state is a dict from key to a buffer: ``[times, column, ...]``,
lists sorted by event time (equal times in arrival order), one column per field
the aggregates read. The dict is kept in the order keys were last touched, so
:meth:`Engine.evict` finds idle keys at its front, in time proportional to what
it evicts.

For each event: the watermark moves to the latest time seen minus
``out_of_orderness``; an event older than the watermark minus
``allowed_lateness`` (the *edge*) is too late and left to the late policy
(``update`` applies it all the same). The key's buffer first forgets what no
event at or after the edge can see (:func:`~.windows.cut_of`), then takes the
event, then each window's slice is aggregated. Forgetting and evicting only ever
drop what no accepted event can see, so neither changes a value.

**How it is fast.** Everything the definition decides is decided once, when the
engine is built: the per-event loop is Python source generated for this
definition (:meth:`Engine.source` shows it) and compiled, with each window's
bounds (a ``bisect`` for sliding windows, two for tumbling and hopping ones)
written inline, the aggregates of a window computed from one slice per column
that they share, and no call, dict of aggregates or loop over features per
event. Each aggregate is the same float expression as in :mod:`.aggregates`
over the same slice in the same order, so the values are those of the plain
per-aggregate loop, bit for bit (a test runs both side by side).
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from itertools import count, islice
from typing import Any

from .aggregates import column_kind, empty_value
from .definition import Feature, FeatureSet, Window
from .sketch import DEFAULT_PRECISION, estimate_codes
from .windows import Cut, cut_of, range_of, scaled

__all__ = ["Engine", "Partition"]

Buffer = list[list[Any]]
#: ``(part, keys, times, *columns) -> (values or None per event, indexes of too-late events)``.
Apply = Callable[..., tuple[list[Any], list[int]]]


class Partition:
    """The state of one source partition: per-key buffers, the latest time, what is applied.

    ``applied`` is the highest source offset whose event is in the state (``None``
    before the first); ``touched`` and ``evicted`` gather the keys changed since the
    stage last recorded them (for the state store).
    """

    __slots__ = ("applied", "evicted", "keys", "max_time", "touched")

    def __init__(self) -> None:
        self.keys: dict[Any, Buffer] = {}
        self.max_time: float = float("-inf")
        self.applied: Any = None
        self.touched: set[Any] = set()
        self.evicted: set[Any] = set()

    def __len__(self) -> int:
        return len(self.keys)


def _std_of(values: list[Any]) -> float:
    """:func:`.aggregates._std` of a slice: the same operations in the same order."""
    n = len(values)
    mean = float(sum(values)) / n
    return math.sqrt(sum([(x - mean) * (x - mean) for x in values]) / n)


#: Aggregates computed from the window's slice of their column (``{s}``), as in .aggregates.
_OF_SLICE = {
    "sum": "float(sum({s}))",
    "mean": "float(sum({s})) / ({hi} - lo)",
    "min": "float(min({s}))",
    "max": "float(max({s}))",
    "std": "_std_of({s})",
    "distinct": "float(len(set({s})))",
    "approx_distinct": "_estimate({s}, {p})",
}


class Engine:
    """Computes a feature set's values event by event; see the module docstring.

    ``columns`` lists the ``(field, kind)`` pairs an event carries after its key and
    time, in order (:func:`~.aggregates.column_kind`): ``number`` fields are read as
    floats, ``value`` ones (``distinct``) as they are, ``hllP`` ones as HyperLogLog
    codes.
    """

    __slots__ = ("_apply", "_cut", "_source", "columns", "definition", "delay", "scale", "width")

    def __init__(self, definition: FeatureSet) -> None:
        self.definition = definition
        in_ms = definition.time not in (None, "processing") and definition.time_unit == "ms"
        self.scale = 1000 if in_ms else 1
        self.delay = scaled(definition.out_of_orderness + definition.allowed_lateness, self.scale)
        self.width = len(definition.features)
        columns: list[tuple[str, str]] = []
        #: Per window: its features (index, feature, buffer column), in declaration order.
        groups: dict[Window, list[tuple[int, Feature, int]]] = {}
        for j, feature in enumerate(definition.features):
            column = 0
            if feature.field is not None:
                spec = (feature.field, column_kind(feature))
                if spec not in columns:
                    columns.append(spec)
                column = 1 + columns.index(spec)
            groups.setdefault(feature.window, []).append((j, feature, column))
        self.columns = columns
        self._cut: Cut = cut_of(list(groups), self.scale)
        self._source, self._apply = self._compile(groups)

    # -- the per-event loop, generated once ---------------------------------------------------

    def _compile(self, groups: dict[Window, list[tuple[int, Feature, int]]]) -> tuple[str, Apply]:
        """The source of this definition's per-event loop, and the loop compiled."""
        ncols = len(self.columns)
        scale = self.scale
        consts: dict[str, Any] = {
            "DELAY": self.delay,
            "_cut": self._cut,
            "_std_of": _std_of,
            "_estimate": estimate_codes,
            "bisect_left": bisect_left,
            "bisect_right": bisect_right,
            "islice": islice,
            "count": count,
        }
        buffers = [f"b{c}" for c in range(ncols + 1)]
        inputs = [f"C{c}" for c in range(1, ncols + 1)]
        windows = list(groups)
        spans = [scaled(w.size, scale) for w in windows if w.kind != "session"]
        update = self.definition.late == "update"
        body: list[str] = []
        emit = body.append
        emit(f"def apply(part, KEYS, TIMES{''.join(', ' + c for c in inputs)}):")
        emit("    keys = part.keys")
        emit("    pop = keys.pop")
        emit("    latest = part.max_time")
        emit("    out = []")
        emit("    late = []")
        emit("    put = out.append")
        emit("    for i, key, t in zip(count(), KEYS, TIMES):")
        emit("        if t > latest:")
        emit("            latest = t")
        emit("        edge = latest - DELAY")
        emit("        if t < edge:")
        emit("            late.append(i)")
        if not update:
            emit("            put(None)")
            emit("            continue")
        emit("        state = pop(key, None)")
        emit("        if state is None:")
        for b in buffers:
            emit(f"            {b} = []")
        emit(f"            state = [{', '.join(buffers)}]")
        emit("        else:")
        emit(f"            {', '.join(buffers)}, = state")
        emit("            if b0:")
        if all(w.kind != "session" for w in windows):
            consts["SPAN"] = max(spans)
            emit("                x = edge - SPAN")
            emit("                forget = bisect_right(b0, x) if b0[0] <= x else 0")
        else:
            emit("                forget = _cut(b0, edge)")
        emit("                if forget:")
        for b in buffers:
            emit(f"                    del {b}[:forget]")
        emit("        keys[key] = state  # last touched: to the end")
        # In order (the common case): appended, no bisect.
        emit("        if not b0 or b0[-1] <= t:")
        emit("            pos = len(b0)")
        emit("            b0.append(t)")
        for c in range(1, ncols + 1):
            emit(f"            b{c}.append(C{c}[i])")
        emit("        else:")
        emit("            pos = bisect_right(b0, t)")
        emit("            b0.insert(pos, t)")
        for c in range(1, ncols + 1):
            emit(f"            b{c}.insert(pos, C{c}[i])")
        # Sliding windows first, longest first: each one's start is at or after the
        # previous one's, so its bisect starts there (none when that is already inside).
        order = sorted(
            range(len(windows)),
            key=lambda g: (windows[g].kind != "sliding", -windows[g].size, g),
        )
        for k, g in enumerate(order):
            nested = k > 0 and windows[order[k - 1]].kind == "sliding"
            self._window(g, windows[g], groups[windows[g]], consts, emit, nested)
        emit(f"        put([{', '.join(f'v{j}' for j in range(self.width))}])")
        emit("    part.max_time = latest")
        emit("    touched = part.touched")
        if update:
            emit("    touched.update(KEYS)")
        else:
            emit("    if late:")
            emit("        skip = set(late)")
            emit("        touched.update([k for i, k in enumerate(KEYS) if i not in skip])")
            emit("    else:")
            emit("        touched.update(KEYS)")
        emit("    return out, late")
        # Constants are the factory's arguments: the loop reads them as fast as its locals.
        source = "\n".join(
            [f"def make({', '.join(consts)}):"]
            + ["    " + line for line in body]
            + ["    return apply"]
        )
        namespace: dict[str, Any] = {}
        exec(compile(source, f"<features {self.definition.name}>", "exec"), namespace)  # noqa: S102 - our own source
        apply: Apply = namespace["make"](**consts)
        return source, apply

    def _window(
        self,
        g: int,
        window: Window,
        features: list[tuple[int, Feature, int]],
        consts: dict[str, Any],
        emit: Callable[[str], None],
        nested: bool,
    ) -> None:
        """The lines computing one window's features (``v{j}``) for the event at ``pos``;
        ``nested``: ``lo`` holds the start of a longer sliding window (a lower bound)."""
        size = scaled(window.size, self.scale)
        consts[f"S{g}"] = size
        emit(f"        # {window.describe()}: {', '.join(f.name for _, f, _ in features)}")
        if window.kind == "sliding":
            # bisect_right(b0, t - size): never past pos, since b0[pos] is t.
            emit(f"        x = t - S{g}")
            if nested:
                emit("        if b0[lo] <= x:")
                emit("            lo = bisect_right(b0, x, lo, pos)")
            else:
                emit("        lo = 0 if b0[0] > x else bisect_right(b0, x, 0, pos)")
            emit("        hi = pos + 1")
        elif window.kind in ("tumbling", "hopping"):
            step = f"S{g}"
            if window.kind == "hopping":
                assert window.hop is not None
                consts[f"H{g}"] = scaled(window.hop, self.scale)
                step = f"H{g}"
            emit(f"        start = (t // {step}) * {step}")
            emit("        lo = bisect_left(b0, start)")
            emit(f"        hi = bisect_left(b0, start + S{g})")
        else:
            consts[f"W{g}"] = range_of(window, self.scale)
            emit(f"        lo, hi = W{g}(b0, t, pos)")
        current = [(j, f, c) for j, f, c in features if f.current]
        earlier = [(j, f, c) for j, f, c in features if not f.current]
        for j, f, c in current:
            self._aggregate(j, f, c, "hi", current, consts, emit, "        ")
        if earlier:
            emit("        if lo < pos:")
            for j, f, c in earlier:
                self._aggregate(j, f, c, "pos", earlier, consts, emit, "            ")
            emit("        else:")
            for j, f, _ in earlier:
                consts[f"E{j}"] = empty_value(f)
                emit(f"            v{j} = E{j}")

    @staticmethod
    def _aggregate(
        j: int,
        feature: Feature,
        c: int,
        hi: str,
        group: list[tuple[int, Feature, int]],
        consts: dict[str, Any],
        emit: Callable[[str], None],
        indent: str,
    ) -> None:
        """The lines setting ``v{j}``, ``feature``'s value over ``b{c}[lo:{hi}]``: one slice
        per column, made by the first aggregate of the group that needs it."""
        agg = feature.agg
        if agg == "count":
            emit(f"{indent}v{j} = float({hi} - lo)")
        elif agg == "last":
            emit(f"{indent}v{j} = float(b{c}[{hi} - 1])")
        elif agg == "ewm":
            assert feature.alpha is not None
            consts[f"A{j}"] = float(feature.alpha)
            emit(f"{indent}m = float(b{c}[lo])")
            emit(f"{indent}for y in islice(b{c}, lo + 1, {hi}):")
            emit(f"{indent}    m += A{j} * (y - m)")
            emit(f"{indent}v{j} = m")
        else:
            sliced = f"s{c}" if hi == "hi" else f"e{c}"
            first = next(k for k, f, col in group if col == c and f.agg in _OF_SLICE)
            if first == j:
                emit(f"{indent}{sliced} = b{c}[lo:{hi}]")
            precision = feature.precision or DEFAULT_PRECISION
            emit(f"{indent}v{j} = " + _OF_SLICE[agg].format(s=sliced, hi=hi, p=precision))

    def source(self) -> str:
        """The Python source of the per-event loop generated for this definition."""
        return self._source

    # -- applying events ----------------------------------------------------------------------

    def apply(self, part: Partition, rows: Sequence[Sequence[Any]]) -> tuple[list[Any], list[int]]:
        """Each row's values (``None`` for a too-late row left to the policy), and the rows
        that were too late. A row is ``(key, time, value, ...)``, per :attr:`columns`."""
        if not rows:
            return [], []
        return self._apply(part, *zip(*rows, strict=True))

    def apply_columns(
        self,
        part: Partition,
        keys: Sequence[Any],
        times: Sequence[Any],
        columns: Sequence[Sequence[Any]],
    ) -> tuple[list[Any], list[int]]:
        """:meth:`apply` on the same events as columns: their keys, their times and one
        sequence per entry of :attr:`columns`, all in arrival order."""
        return self._apply(part, keys, times, *columns)

    def evict(self, part: Partition) -> int:
        """Forget the keys no future accepted event can see; return how many.

        Walks the keys from the least recently touched and stops at the first that is
        still needed, so the work is the evicted keys plus one.
        """
        edge = part.max_time - self.delay
        cut = self._cut
        gone = []
        for key, state in part.keys.items():
            times = state[0]
            if cut(times, edge) < len(times):
                break
            gone.append(key)
        keys = part.keys
        for key in gone:
            del keys[key]
        part.evicted.update(gone)
        part.touched.difference_update(gone)
        return len(gone)
