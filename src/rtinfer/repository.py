"""The model repository on disk, and updates to a running ModelServer with no failed request.

:class:`ModelRepository` reads the layout ``rtinfer serve REPO`` serves::

    REPO/<model>/config.yaml           optional: batching, threads, protections, auto_promote
    REPO/<model>/<version>/model.onnx  one folder per version (or model.txt, LightGBM)

:class:`ModelManager` changes what a started :class:`~rtinfer.serving.ModelServer`
serves while it serves (docs/repository.md):

- :meth:`~ModelManager.load` builds a version beside the others (the model file is read
  on a thread), loads and warms it up on its own model thread for every batch size in
  use, and only then makes it reachable: requests naming its version find it;
- :meth:`~ModelManager.promote` makes a loaded version the default, the one that answers
  requests naming none: one reference swap on the event loop, so a request resolved
  before it finishes on the old version and every later one goes to the new. The old
  version stays reachable for ``retire_grace_s`` (a request between resolving its model
  and submitting to it still finds it), then its batcher runs what is queued and closes;
- :meth:`~ModelManager.unload` retires a version the same way; the default only with
  ``force`` (another version is promoted first);
- :meth:`~ModelManager.canary` sends a share of the requests naming no version to a
  candidate: by a stable hash of their routing key (one key always sees one version),
  or by a counter for requests without a key (:class:`Canary`);
- :meth:`~ModelManager.shadow` gives a candidate a copy of each request the default
  answers, after the answer has left, bounded, never awaited by the request; the two
  answers are compared and recorded (:class:`Shadow`);
- with ``watch_s``, :meth:`~ModelManager.poll` runs every ``watch_s`` seconds: version
  folders that appear (and whose model file has stopped changing) are loaded, and
  promoted when higher than the default (``auto_promote: false`` in the model's
  ``config.yaml`` leaves them loaded only); versions whose folder is gone are unloaded,
  never a model's last one.

Every operation runs on the event loop, one at a time (a lock); none blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .batching import MicroBatcher
from .exceptions import ConfigError, DeadlineExceeded, Overloaded, RtinferError
from .observability.metrics import Metrics
from .serving import ModelNotFound, ModelPolicy, ModelServer, ServedModel
from .types import Arrays, Loader, Model

__all__ = [
    "Canary",
    "ModelManager",
    "ModelRepository",
    "Shadow",
    "UpdateRefused",
    "compare_outputs",
    "version_key",
]

log = logging.getLogger("rtinfer.repository")

MODEL_FILES = ("model.onnx", "model.txt")
#: Basis points: a canary's share is decided in steps of 0.01 %.
_BUCKETS = 10_000


class UpdateRefused(RtinferError):
    """An update that the served models' state does not allow (HTTP 409): unloading the
    default without ``force``, promoting a version that is not loaded, ..."""


def version_key(version: str) -> tuple[int, int, str]:
    """How versions sort: whole numbers by value, then other names alphabetically."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


# -- the repository on disk -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """What a model's ``config.yaml`` says: batcher and ONNX Runtime settings, protections,
    and whether the watch promotes new versions (``auto_promote``, default true)."""

    batching: Mapping[str, Any]
    onnx: Mapping[str, Any]
    policy: ModelPolicy
    auto_promote: bool = True


#: A model file's identity for the watch: (size, modification time in ns).
Signature = tuple[int, int]


class ModelRepository:
    """The folder ``REPO/<model>/<version>/model.onnx`` (see the module).

    Hidden folders (``.tmp-3``) are ignored: write a new version under a hidden name
    and rename it, and the watch never sees it half written.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        allow_pickle: bool = False,
        load: Loader | None = None,
    ) -> None:
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        self._load = load  # how a version's model is built (load_model's signature)
        if not self.path.is_dir():
            raise ConfigError(f"model repository {str(self.path)!r} is not a folder")

    def scan(self) -> dict[tuple[str, str], Signature]:
        """Every version folder holding a model file, with its file's signature.

        Blocking file-system calls: run it on a thread from the event loop.
        """
        found: dict[tuple[str, str], Signature] = {}
        for model in _folders(self.path):
            for version in _folders(model):
                file = _model_file(version)
                if file is None:
                    continue
                try:
                    stat = file.stat()
                except OSError:  # removed between listing and stat
                    continue
                found[(model.name, version.name)] = (stat.st_size, stat.st_mtime_ns)
        return found

    def models(self) -> list[str]:
        return [p.name for p in _folders(self.path)]

    def versions(self, name: str) -> list[str]:
        """The versions of ``name`` on disk (with a model file), lowest first."""
        folder = self.path / name
        if not folder.is_dir():
            raise ModelNotFound(
                f"the repository {str(self.path)!r} has no model {name!r}; it has "
                f"{', '.join(self.models()) or 'none'}"
            )
        versions = [v.name for v in _folders(folder) if _model_file(v) is not None]
        return sorted(versions, key=version_key)

    def settings(self, name: str) -> ModelSettings:
        """The model's ``config.yaml`` (checked as ``rtinfer serve`` checks it)."""
        # The layout's checks live with rtinfer serve, which reads the repository at
        # start-up; imported here (serve imports this module's users).
        from .serve import _CONFIG_KEYS, _ONNX_KEYS, _policy, _read_config

        path = self.path / name / "config.yaml"
        config = _read_config(path)
        auto = config.get("auto_promote", True)
        if not isinstance(auto, bool):
            raise ConfigError(
                f"must be true or false; got {auto!r}", file=str(path), key="auto_promote"
            )
        others = set(self.models()) - {name}
        batching = {k: v for k, v in config.items() if k in _CONFIG_KEYS}
        if "max_delay_ms" in batching:
            batching["max_delay"] = batching.pop("max_delay_ms") / 1e3
        onnx = {k: v for k, v in config.items() if k in _ONNX_KEYS}
        return ModelSettings(batching, onnx, _policy(config, path, others), auto)

    def build(self, name: str, version: str) -> tuple[Model, ModelSettings]:
        """The model of one version, not loaded yet (a LightGBM file is converted here:
        call it on a thread), and its model's settings."""
        from .models import load_model

        load = self._load or load_model
        folder = self.path / name / version
        file = _model_file(folder) if folder.is_dir() else None
        if file is None:
            have = ", ".join(self.versions(name)) or "none"
            raise ModelNotFound(
                f"the repository has no version {version!r} of model {name!r} (no "
                f"{' or '.join(MODEL_FILES)} in {str(folder)!r}); it has {have}"
            )
        settings = self.settings(name)
        model = load(
            file, name=name, version=version, allow_pickle=self.allow_pickle, **settings.onnx
        )
        return model, settings


def _folders(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def _model_file(folder: Path) -> Path | None:
    return next((folder / f for f in MODEL_FILES if (folder / f).is_file()), None)


# -- canary and shadow --------------------------------------------------------------------


class Canary:
    """Sends ``percent`` % of a model's requests that name no version to ``candidate``.

    A request with a routing key goes by a stable hash of it (BLAKE2b of the model,
    the candidate's version and the key: the same in every process and across
    restarts), so one key always sees one version, and raising the share keeps the
    keys already on the candidate there. Requests without a key are split by a
    counter, exactly ``percent`` % of them.
    """

    __slots__ = (
        "_credit",
        "_m_candidate",
        "_m_primary",
        "_salt",
        "candidate",
        "percent",
        "threshold",
    )

    def __init__(self, candidate: ServedModel, percent: float, metrics: Metrics) -> None:
        if not 0 < percent < 100:
            raise ValueError(
                f"a canary's share must be above 0 and below 100 percent, got {percent}; "
                "promote the version for 100, stop the canary for 0"
            )
        self.candidate = candidate
        self.percent = float(percent)
        self.threshold = round(percent * _BUCKETS / 100)
        self._salt = f"{candidate.name}\0{candidate.version}\0".encode()
        self._credit = 0.0
        self._m_candidate = metrics.canary_requests.labels(candidate.name, candidate.version)
        self._m_primary = metrics.canary_requests.labels(candidate.name, "default")

    def bucket(self, key: str | bytes) -> int:
        """The key's bucket, 0 to 9,999: below ``threshold`` goes to the candidate."""
        raw = key.encode() if isinstance(key, str) else key
        digest = hashlib.blake2b(self._salt + raw, digest_size=8).digest()
        return int.from_bytes(digest, "big") % _BUCKETS

    def pick(self, primary: ServedModel, key: str | bytes | None) -> ServedModel:
        """The version that answers a request with this routing key (``None``: none)."""
        if key:
            chosen = self.bucket(key) < self.threshold
        else:
            self._credit += self.percent
            chosen = self._credit >= 100.0
            if chosen:
                self._credit -= 100.0
        if chosen:
            self._m_candidate.inc()
            return self.candidate
        self._m_primary.inc()
        return primary


def compare_outputs(primary: Arrays, candidate: Arrays) -> tuple[float, str | None, int | None]:
    """The largest absolute difference between two answers, and where (output, row).

    ``inf`` when they cannot be compared (an output missing, another shape, text that
    differs); NaN equals NaN. ``(0.0, None, None)`` when they are equal.
    """
    worst, where, row = 0.0, None, None
    for name, a in primary.items():
        b = candidate.get(name)
        if b is None or np.shape(a) != np.shape(b):
            return math.inf, name, None
        if a.dtype.kind in "biuf" and b.dtype.kind in "biuf":
            x, y = a.astype(np.float64, copy=False), b.astype(np.float64, copy=False)
            diff = np.abs(x - y)
            same_nan = np.isnan(x) & np.isnan(y)
            diff = np.where(same_nan, 0.0, np.where(np.isnan(diff), np.inf, diff))
        else:
            diff = np.where(a == b, 0.0, np.inf)
        if diff.size == 0:
            continue
        flat = int(np.argmax(diff))
        value = float(diff.reshape(-1)[flat])
        if value > worst:
            per_row = max(1, diff.size // max(1, len(diff)))
            worst, where, row = value, name, flat // per_row
    return worst, where, row


class Shadow:
    """A candidate that gets a copy of the requests a model's default version answers.

    :meth:`offer` is called after the default has answered: it starts a task that runs
    the same inputs through the candidate's micro-batcher (no limiter, breaker or
    cache: the candidate's own queue, with a deadline of ``timeout_s``) and compares
    the answers. The request never awaits it: a slow or failing candidate cannot slow
    or fail it. At most ``max_in_flight`` copies run at once; past that a copy is
    dropped and counted. An answer differing by more than ``tolerance`` (absolute) is
    a mismatch; the last ``max_samples`` mismatches are kept for the management API.
    """

    def __init__(
        self,
        candidate: ServedModel,
        metrics: Metrics,
        *,
        tolerance: float = 1e-6,
        max_in_flight: int = 32,
        timeout_s: float = 1.0,
        max_samples: int = 20,
    ) -> None:
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be 0 or more, got {tolerance}")
        self.candidate = candidate
        self.tolerance = float(tolerance)
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.compared = 0
        self.mismatches = 0
        self.skipped: dict[str, int] = {}
        self.samples: deque[dict[str, Any]] = deque(maxlen=max_samples)
        self._tasks: set[asyncio.Task[None]] = set()
        labels = (candidate.name, candidate.version)
        self._m_compared = metrics.shadow_compared.labels(*labels)
        self._m_mismatch = metrics.shadow_mismatch.labels(*labels)
        self._m_diff = metrics.shadow_difference.labels(*labels)
        self._m_skipped = metrics.shadow_skipped
        self._labels = labels

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def offer(self, inputs: Arrays, outputs: Arrays, primary: ServedModel) -> None:
        """Compare ``outputs`` (the default's answer) with the candidate's, later."""
        if len(self._tasks) >= self.max_in_flight:
            self._skip("busy")
            return
        task = asyncio.get_running_loop().create_task(self._compare(inputs, outputs, primary))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self._m_skipped.labels(*self._labels, reason).inc()

    async def _compare(self, inputs: Arrays, outputs: Arrays, primary: ServedModel) -> None:
        try:
            theirs = await self.candidate.batcher.submit(
                inputs, deadline=time.time() + self.timeout_s, wait=False
            )
        except Overloaded:
            self._skip("overloaded")
            return
        except DeadlineExceeded:
            self._skip("deadline")
            return
        except Exception:
            self._skip("failed")
            return
        worst, output, row = compare_outputs(outputs, theirs)
        self.compared += 1
        self._m_compared.inc()
        if math.isfinite(worst):
            self._m_diff.observe(worst)
        if worst > self.tolerance:
            self.mismatches += 1
            self._m_mismatch.inc()
            self.samples.append(
                _sample(primary, self.candidate, worst, output, row, inputs, outputs, theirs)
            )

    def report(self) -> dict[str, Any]:
        """Counts and the recent mismatches, for the management API."""
        return {
            "version": self.candidate.version,
            "tolerance": self.tolerance,
            "compared": self.compared,
            "mismatches": self.mismatches,
            "skipped": dict(self.skipped),
            "in_flight": self.in_flight,
            "samples": list(self.samples),
        }

    async def aclose(self) -> None:
        """Stop the copies still running (nobody waits for them)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


_SAMPLE_VALUES = 16  # values of a row kept in a mismatch sample


def _row(arrays: Arrays, row: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, array in arrays.items():
        if row is None or row >= len(array):
            continue
        values = np.asarray(array[row]).reshape(-1)[:_SAMPLE_VALUES]
        out[name] = [v if isinstance(v, str) else _number(v) for v in values.tolist()]
    return out


def _number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or infinity
    return value


def _sample(
    primary: ServedModel,
    candidate: ServedModel,
    worst: float,
    output: str | None,
    row: int | None,
    inputs: Arrays,
    ours: Arrays,
    theirs: Arrays,
) -> dict[str, Any]:
    return {
        "at": time.time(),
        "default_version": primary.version,
        "candidate_version": candidate.version,
        "max_abs_difference": worst if math.isfinite(worst) else None,
        "output": output,
        "row": row,
        "inputs": _row(inputs, row if row is not None else 0),
        "default": _row(ours, row),
        "candidate": _row(theirs, row),
    }


# -- the updates ----------------------------------------------------------------------------


class ModelManager:
    """Load, promote, unload, canary and shadow the versions a started server serves.

    ``repository``: where :meth:`load` finds versions (``None``: only what is already
    served can be promoted, unloaded, canaried or shadowed). ``retire_grace_s``: how
    long a version taken out of routing (promoted over, unloaded) stays reachable for
    the requests that already resolved it, before its batcher drains and closes.
    ``watch_s``: poll the repository every so many seconds (``None``: no watch).
    Call :meth:`start` once the server has started, :meth:`aclose` before it closes.
    """

    def __init__(
        self,
        server: ModelServer,
        repository: ModelRepository | None = None,
        *,
        retire_grace_s: float = 2.0,
        watch_s: float | None = None,
    ) -> None:
        if watch_s is not None and (repository is None or not watch_s > 0):
            raise ConfigError("watching needs a model repository and an interval above 0 s")
        self.server = server
        self.repository = repository
        self.retire_grace_s = retire_grace_s
        self.watch_s = watch_s
        self.shadows: dict[str, Shadow] = {}
        self._lock = asyncio.Lock()
        self._loading: set[tuple[str, str]] = set()
        self._retiring: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._failed: dict[tuple[str, str], tuple[Signature | None, str]] = {}
        self._seen: dict[tuple[str, str], Signature] = {}
        #: Versions the watch leaves alone: on disk at start, or loaded once (a version
        #: promoted over, or unloaded by hand, is not loaded again while its folder stays).
        self._known: set[tuple[str, str]] = set()
        self._watch: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the watch (when ``watch_s``): what is on disk now counts as seen."""
        if self.watch_s is not None and self._watch is None:
            assert self.repository is not None
            self._seen = await asyncio.to_thread(self.repository.scan)
            self._known = set(self._seen)
            self._watch = asyncio.get_running_loop().create_task(self._watch_loop())

    async def aclose(self) -> None:
        """Stop the watch and the shadows; retiring versions close with the server."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        for task in list(self._retiring.values()):
            task.cancel()
        await asyncio.gather(*self._retiring.values(), return_exceptions=True)
        self._retiring.clear()
        for shadow in list(self.shadows.values()):
            await shadow.aclose()
        self.shadows.clear()
        self.server.shadows.clear()
        self.server.canaries.clear()

    # -- what is served ----------------------------------------------------------------

    async def index(self) -> list[dict[str, Any]]:
        """Every version: served, loading, retiring, failed, or only on disk.

        Each entry has the Open Inference Protocol's ``name``, ``version``, ``state``
        (``READY``, ``LOADING``, ``UNLOADING``, ``UNAVAILABLE``) and ``reason``, plus
        ``default`` and, where they apply, ``canary_percent`` and ``shadow``.
        """
        server = self.server
        entries: dict[tuple[str, str], dict[str, Any]] = {}
        for served in server.all():
            key = (served.name, served.version)
            retiring = key in self._retiring
            entry: dict[str, Any] = {
                "name": served.name,
                "version": served.version,
                "state": "UNLOADING" if retiring else "READY",
                "reason": "retiring: drains, then closes" if retiring else "",
                "default": server.get(served.name) is served,
            }
            canary = server.canaries.get(served.name)
            if canary is not None and canary.candidate is served:
                entry["canary_percent"] = canary.percent
            shadow = self.shadows.get(served.name)
            if shadow is not None and shadow.candidate is served:
                entry["shadow"] = shadow.report()
            entries[key] = entry
        for key in self._loading:
            entries.setdefault(key, _entry(key, "LOADING", "loading and warming up"))
        for key, (_, reason) in self._failed.items():
            entries.setdefault(key, _entry(key, "UNAVAILABLE", f"failed to load: {reason}"))
        if self.repository is not None:
            for key in await asyncio.to_thread(self.repository.scan):
                entries.setdefault(key, _entry(key, "UNAVAILABLE", "in the repository, not loaded"))
        return sorted(entries.values(), key=lambda e: (e["name"], version_key(e["version"])))

    def _versions(self, name: str) -> list[ServedModel]:
        return [s for s in self.server.all() if s.name == name]

    # -- load ----------------------------------------------------------------------------

    async def load(
        self, name: str, version: str | None = None, *, promote: bool = False
    ) -> ServedModel:
        """Load and warm up a version from the repository beside those served.

        ``version=None``: the highest on disk. A version already served is left as it
        is. A model's first version becomes its default; later ones answer only the
        requests naming them until :meth:`promote` (or ``promote=True``, once warm).
        """
        async with self._lock:
            served = await self._load(name, version)
            if promote:
                self._promote(served, keep_previous=False)
            return served

    async def _load(self, name: str, version: str | None) -> ServedModel:
        repository = self.repository
        if repository is None:
            raise UpdateRefused(
                "this server has no model repository to load from; serve a repository folder"
            )
        if version is None:
            versions = await asyncio.to_thread(repository.versions, name)
            if not versions:
                raise ModelNotFound(f"the repository has no version of model {name!r}")
            version = versions[-1]
        for served in self._versions(name):
            if served.version == version:
                if (name, version) in self._retiring:  # brought back before it closed
                    self._retiring.pop((name, version)).cancel()
                return served
        key = (name, version)
        self._loading.add(key)
        signature = (await asyncio.to_thread(repository.scan)).get(key)
        try:
            model, settings = await asyncio.to_thread(repository.build, name, version)
            server = self.server
            batcher = MicroBatcher(
                model, metrics=server.metrics, **{**server.batching, **settings.batching}
            )
            served = await server.install(model, name=name, batcher=batcher, policy=settings.policy)
        except ModelNotFound:
            raise
        except Exception as exc:
            self._failed[key] = (signature, str(exc))
            log.error("loading version %r of model %r failed: %s", version, name, exc)
            raise
        finally:
            self._loading.discard(key)
        self._failed.pop(key, None)
        self._known.add(key)
        log.info("loaded version %r of model %r (warmed up)", version, name)
        return served

    # -- promote --------------------------------------------------------------------------

    async def promote(self, name: str, version: str, *, keep_previous: bool = False) -> ServedModel:
        """Make a loaded ``version`` the default at once; retire the previous one unless
        ``keep_previous`` (it then stays loaded, answering requests that name it)."""
        async with self._lock:
            served = self._served(name, version)
            return self._promote(served, keep_previous=keep_previous)

    def _served(self, name: str, version: str) -> ServedModel:
        try:
            return self.server.get(name, version)
        except ModelNotFound as exc:
            on_disk = (
                self.repository is not None
                and _model_file(self.repository.path / name / version) is not None
            )
            if on_disk:
                raise UpdateRefused(f"{exc}; load it first (it is in the repository)") from None
            raise

    def _promote(self, served: ServedModel, *, keep_previous: bool) -> ServedModel:
        name = served.name
        if (name, served.version) in self._retiring:  # promoted back before it closed
            self._retiring.pop((name, served.version)).cancel()
        canary = self.server.canaries.get(name)
        if canary is not None and canary.candidate is served:
            del self.server.canaries[name]  # it takes every request now
        self._stop_shadow(name, only=served)
        previous = self.server.promote(name, served.version)
        if previous is not served:
            log.info(
                "model %r: version %r promoted over %r", name, served.version, previous.version
            )
            if not keep_previous:
                self._retire(previous)
        return served

    # -- unload ---------------------------------------------------------------------------

    async def unload(self, name: str, version: str | None = None, *, force: bool = False) -> None:
        """Retire a version: out of routing at once, closed once drained.

        The default version only with ``force``: the highest other version is promoted
        first, or, if there is none, the model goes (its requests get 404).
        ``version=None`` unloads every version of the model (``force`` needed).
        Returns once the batchers have closed.
        """
        async with self._lock:
            versions = self._versions(name)
            if not versions:
                raise ModelNotFound(f"no model {name!r} is served")
            targets = versions if version is None else [self._served(name, version)]
            default = self.server.get(name)
            if default in targets:
                if not force:
                    raise UpdateRefused(
                        f"version {default.version!r} is model {name!r}'s default: promote "
                        "another version first, or unload with force"
                    )
                others = [
                    s
                    for s in versions
                    if s not in targets and (s.name, s.version) not in self._retiring
                ]
                if others:
                    highest = max(others, key=lambda s: version_key(s.version))
                    self._promote(highest, keep_previous=True)
            tasks = [self._retire(served) for served in targets]
        await asyncio.gather(*tasks, return_exceptions=True)

    def _retire(self, served: ServedModel) -> asyncio.Task[None]:
        key = (served.name, served.version)
        task = self._retiring.get(key)
        if task is not None:
            return task
        canary = self.server.canaries.get(served.name)
        if canary is not None and canary.candidate is served:
            del self.server.canaries[served.name]
        self._stop_shadow(served.name, only=served)
        task = asyncio.get_running_loop().create_task(self._close_after_grace(served))
        self._retiring[key] = task
        return task

    async def _close_after_grace(self, served: ServedModel) -> None:
        key = (served.name, served.version)
        try:
            # Requests that resolved this version before it left routing still find it.
            await asyncio.sleep(self.retire_grace_s)
        except asyncio.CancelledError:
            if self._retiring.get(key) is asyncio.current_task():
                del self._retiring[key]
            raise
        with contextlib.suppress(ModelNotFound):
            self.server.withdraw(served.name, served.version)
        self._retiring.pop(key, None)
        await served.batcher.aclose()  # runs what is queued, then stops its threads
        log.info("model %r: version %r unloaded", served.name, served.version)

    # -- canary and shadow ------------------------------------------------------------

    def canary(self, name: str, version: str | None, percent: float = 0.0) -> Canary | None:
        """Send ``percent`` % of the requests naming no version to ``version`` (loaded);
        ``version=None`` or ``percent=0`` stops the canary."""
        server = self.server
        if version is None or percent == 0:
            server.get(name)
            return server.canaries.pop(name, None)
        candidate = self._candidate(name, version, "a canary")
        canary = Canary(candidate, percent, server.metrics)
        server.canaries[name] = canary
        log.info("model %r: canary %r takes %s%% of the requests", name, version, percent)
        return canary

    def shadow(self, name: str, version: str | None, *, tolerance: float = 1e-6) -> Shadow | None:
        """Give ``version`` (loaded) a copy of the requests the default answers;
        ``version=None`` stops the shadow."""
        if version is None:
            self.server.get(name)
            return self._stop_shadow(name)
        candidate = self._candidate(name, version, "a shadow")
        self._stop_shadow(name)
        shadow = Shadow(candidate, self.server.metrics, tolerance=tolerance)
        self.shadows[name] = shadow
        self.server.shadows[name] = shadow
        log.info("model %r: version %r shadows the default", name, version)
        return shadow

    def _stop_shadow(self, name: str, *, only: ServedModel | None = None) -> Shadow | None:
        shadow = self.shadows.get(name)
        if shadow is None or (only is not None and shadow.candidate is not only):
            return None
        del self.shadows[name]
        self.server.shadows.pop(name, None)
        task = asyncio.get_running_loop().create_task(shadow.aclose())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return shadow

    def _candidate(self, name: str, version: str, what: str) -> ServedModel:
        candidate = self._served(name, version)
        default = self.server.get(name)
        if candidate is default:
            raise UpdateRefused(
                f"version {version!r} is model {name!r}'s default already; {what} needs "
                "another loaded version"
            )
        if (name, version) in self._retiring:
            raise UpdateRefused(f"version {version!r} of model {name!r} is being unloaded")
        if _signature(candidate.model.inputs) != _signature(default.model.inputs):
            raise UpdateRefused(
                f"version {version!r} of model {name!r} takes inputs "
                f"{_describe(candidate.model.inputs)}; the default "
                f"({default.version!r}) takes {_describe(default.model.inputs)}: requests "
                f"checked against one could not run on the other"
            )
        return candidate

    # -- the watch --------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        assert self.watch_s is not None
        while True:
            await asyncio.sleep(self.watch_s)
            try:
                await self.poll()
            except Exception:
                log.exception("polling the model repository failed; trying again")

    async def poll(self) -> list[str]:
        """One round of the watch; what it did, in words (also logged).

        A version folder that appeared since the watch started is loaded once its model
        file has the same size and modification time as at the previous round (a file
        still being copied is left for later); a version that failed to load is tried
        again only when its file changes. Versions on disk at start, or loaded once, are
        left alone (one promoted over or unloaded by hand is not loaded again).
        """
        assert self.repository is not None
        repository = self.repository
        found = await asyncio.to_thread(repository.scan)
        seen, self._seen = self._seen, found
        self._known &= set(found)  # a folder removed and added again is new again
        done: list[str] = []
        served = {(s.name, s.version) for s in self.server.all()}
        for key in sorted(found, key=lambda k: (k[0], version_key(k[1]))):
            if key in served or key in self._known or key in self._loading:
                continue
            signature = found[key]
            if seen.get(key) != signature:
                continue  # new or still changing: wait for one quiet round
            failed = self._failed.get(key)
            if failed is not None and failed[0] == signature:
                continue
            name, version = key
            try:
                async with self._lock:
                    new = await self._load(name, version)
                    done.append(f"loaded {name} {version}")
                    settings = await asyncio.to_thread(repository.settings, name)
                    default = self.server.get(name)
                    if settings.auto_promote and version_key(version) > version_key(
                        default.version
                    ):
                        self._promote(new, keep_previous=False)
                        done.append(f"promoted {name} {version}")
            except Exception as exc:
                done.append(f"failed {name} {version}: {exc}")
        on_disk = {name for name, _ in found}
        for name, version in sorted(served):
            if name not in on_disk or (name, version) in found or (name, version) in self._retiring:
                continue
            if len(self._versions(name)) <= 1:
                log.warning(
                    "model %r: version %r left the repository, but it is the model's last "
                    "version; it is still served",
                    name,
                    version,
                )
                continue
            try:
                await self.unload(name, version, force=True)
                done.append(f"unloaded {name} {version}")
            except Exception as exc:
                done.append(f"failed to unload {name} {version}: {exc}")
        for line in done:
            log.info("watch: %s", line)
        return done


def _entry(key: tuple[str, str], state: str, reason: str) -> dict[str, Any]:
    return {"name": key[0], "version": key[1], "state": state, "reason": reason, "default": False}


def _signature(specs: Any) -> list[tuple[str, str, tuple[int | None, ...]]]:
    return [(s.name, str(s.dtype), tuple(s.shape)) for s in specs]


def _describe(specs: Any) -> str:
    return ", ".join(f"{s.name} {s.dtype} {list(s.shape)}" for s in specs)
