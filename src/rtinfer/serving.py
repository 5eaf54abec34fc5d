"""The models a server answers for, behind their micro-batchers: what HTTP and gRPC share.

A :class:`ModelServer` holds named, versioned models, each behind its own
:class:`~rtinfer.batching.MicroBatcher`, so concurrent requests (and stream
pipelines sharing the batcher) are batched together. The protocol fronts
(REST, gRPC, WebSocket) only translate: they find the model, check and decode
the request, call :meth:`ModelServer.infer`, and encode the answer or the error.

:meth:`ModelServer.infer` is the one place where the serving policy lives, so every
front gets the same: a draining server refuses (:class:`~rtinfer.exceptions.Closed`),
a client over its quota gets :class:`~rtinfer.exceptions.QuotaExceeded` (429), the
model's adaptive limiter admits by priority or sheds (``Overloaded``, 503), then the
model's path runs, built once at :meth:`ModelServer.start`::

    fallback chain ─► step "primary": cache ─► circuit breaker ─► micro-batcher (deadline)
                   ─► step "model:<light>" ─► "rules" ─► "default"

Every piece that is off costs nothing per request: a model without a cache, breaker
or chain submits straight to its batcher.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import numpy.typing as npt

from .batching import SERVICE_TIME, MicroBatcher, ServiceTime
from .exceptions import (
    Closed,
    ConfigError,
    DeadlineExceeded,
    ModelInputError,
    RtinferError,
)
from .observability.looplag import LoopLag
from .observability.metrics import Metrics
from .resilience import (
    AdaptiveLimiter,
    CircuitBreaker,
    ClientQuota,
    FallbackChain,
    Permit,
    PredictionCache,
    Priority,
    Step,
    is_deterministic,
)
from .stages.predict import PRIMARY, model_failure
from .types import Arrays, Model, TensorSpec

if TYPE_CHECKING:
    from .repository import Canary, Shadow
    from .scoring import PipelineScorer

__all__ = [
    "Admission",
    "Inference",
    "ModelNotFound",
    "ModelPolicy",
    "ModelServer",
    "ServedModel",
    "deadline_from_timeout",
    "decode_bytes_tensor",
    "encode_bytes_tensor",
    "numpy_dtype",
    "oip_datatype",
]

#: The event loop's lag under which a served model's limiter may call a window quiet: a
#: loop that is the bottleneck (a model cheaper than its HTTP) runs 10 to 40 ms late.
CALM_LAG_S = 0.002

#: Open Inference Protocol datatypes and their numpy dtypes.
_OIP_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
_NUMPY_TO_OIP = {v: k for k, v in _OIP_TO_NUMPY.items()}


def oip_datatype(dtype: np.dtype[Any]) -> str:
    """The Open Inference Protocol name of a numpy dtype (``FP32`` for float32)."""
    name = _NUMPY_TO_OIP.get(dtype)  # a dtype object (the hot path) is its own key
    if name is not None:
        return name
    try:
        return _NUMPY_TO_OIP[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no Open Inference Protocol datatype") from None


def decode_bytes_tensor(data: bytes, count: int, where: str) -> npt.NDArray[Any]:
    """``count`` BYTES elements of the protocol's binary form, as an object array of ``str``.

    Each element is its length as a 4-byte little-endian integer, then its UTF-8 bytes.
    """
    if 4 * count > len(data):  # before allocating: a huge shape must not cost memory
        raise ModelInputError(
            f"{where}: {count} BYTES elements need at least {4 * count} bytes, got {len(data)}"
        )
    out = np.empty(count, dtype=object)
    offset = 0
    view = memoryview(data)
    for i in range(count):
        if offset + 4 > len(data):
            raise ModelInputError(f"{where}: the BYTES data ends after {i} of {count} elements")
        size = int.from_bytes(view[offset : offset + 4], "little")
        offset += 4
        if offset + size > len(data):
            raise ModelInputError(
                f"{where}: BYTES element {i} claims {size} bytes; only "
                f"{len(data) - offset} are left",
            )  # fmt: skip
        try:
            out[i] = str(view[offset : offset + size], "utf-8")
        except UnicodeDecodeError:
            raise ModelInputError(f"{where}: BYTES element {i} is not UTF-8 text") from None
        offset += size
    if offset != len(data):
        raise ModelInputError(
            f"{where}: {len(data) - offset} bytes left over after {count} BYTES elements"
        )
    return out


def encode_bytes_tensor(array: npt.NDArray[Any]) -> bytes:
    """An object array of ``str`` (or ``bytes``) in the protocol's binary BYTES form."""
    parts: list[bytes] = []
    for value in array.ravel().tolist():
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
        parts.append(len(raw).to_bytes(4, "little"))
        parts.append(raw)
    return b"".join(parts)


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of an Open Inference Protocol datatype name."""
    try:
        return _OIP_TO_NUMPY[datatype]
    except KeyError:
        known = ", ".join(_OIP_TO_NUMPY)
        raise ValueError(f"unknown datatype {datatype!r}; use one of {known}") from None


class ModelNotFound(RtinferError, LookupError):
    """No model (or no such version of it) is served here."""


#: What a served model's composed call returns: the outputs and the fallback step that
#: produced them (``None`` when the model has no fallback chain: the model answered).
Call = Callable[[Arrays, "float | None"], Awaitable[tuple[Arrays, "str | None"]]]


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelPolicy:
    """How one served model is protected: a model repository's ``config.yaml`` sets these.

    - ``priority``: the traffic class of its requests that send no ``X-Priority``
      (``None``: the server's default);
    - ``max_concurrency``: the most requests its adaptive limiter may ever admit at once
      (``None``: the server's setting; ``0``: no limiter);
    - ``breaker``: a circuit breaker around the model's calls, opened by
      ``breaker_failures`` failures in a row, for ``breaker_open_s`` seconds;
    - ``cache``: use the server's prediction cache (when it has one);
      ``deterministic``: whether the same input always gives the same answer
      (``None``: the model's own ``deterministic`` attribute, else true); only
      deterministic models are cached;
    - the fallback chain, tried in this order when the model fails, its breaker is
      open or its queue is full: ``fallback_model`` (another served model, by name),
      ``rules`` (a vectorised callable, ``inputs -> outputs``), ``default`` (the same
      outputs for every row, e.g. ``{"probabilities": [1.0, 0.0]}``).
    """

    priority: Priority | None = None
    max_concurrency: int | None = None
    breaker: bool = True
    breaker_failures: int = 5
    breaker_open_s: float = 5.0
    cache: bool = True
    deterministic: bool | None = None
    fallback_model: str | None = None
    rules: Callable[[Arrays], Arrays] | None = None
    default: Mapping[str, Any] | None = None

    @property
    def has_fallback(self) -> bool:
        return self.fallback_model is not None or self.rules is not None or self.default is not None


class ServedModel:
    """One version of a model, behind its micro-batcher, with its protections.

    ``limiter``, ``breaker``, ``chain`` (the fallback chain) and ``cache`` are built by
    :meth:`ModelServer.start` from the model's :class:`ModelPolicy` (``None``: off), and
    with them ``call``, the one composed function a request runs.
    """

    __slots__ = (
        "batcher",
        "breaker",
        "cache",
        "call",
        "chain",
        "limiter",
        "model",
        "name",
        "policy",
        "priority",
    )

    def __init__(
        self,
        name: str,
        model: Model,
        batcher: MicroBatcher,
        policy: ModelPolicy | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.batcher = batcher
        self.policy = policy or ModelPolicy()
        self.priority = self.policy.priority or Priority.CRITICAL
        self.limiter: AdaptiveLimiter | None = None
        self.breaker: CircuitBreaker | None = None
        self.chain: FallbackChain | None = None
        self.cache: PredictionCache | None = None
        self.call: Call = self._submit

    async def _submit(self, inputs: Arrays, deadline: float | None) -> tuple[Arrays, str | None]:
        return await self.batcher.submit(inputs, deadline=deadline, wait=False, abandon=True), None

    @property
    def version(self) -> str:
        """The model's version (known once it is loaded: a file's content hash by default)."""
        return self.model.version

    @property
    def ready(self) -> bool:
        return self.batcher.ready

    @property
    def deterministic(self) -> bool:
        """Whether the same input always gives the same answer (only then is it cached)."""
        if self.policy.deterministic is not None:
            return self.policy.deterministic
        return is_deterministic(self.model)

    def metadata(self) -> dict[str, Any]:
        """The Open Inference Protocol's model metadata."""
        onnx = type(self.model).__name__ == "OnnxModel"
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "onnxruntime_onnx" if onnx else "python",
            "inputs": [_tensor_metadata(s) for s in self.model.inputs],
            "outputs": [_tensor_metadata(s) for s in self.model.outputs],
        }

    def _primary(self) -> Callable[[Arrays, float | None], Awaitable[Arrays]]:
        """The model's own path, decided once: the cache, then the breaker, then the batcher."""
        batcher, breaker = self.batcher, self.breaker
        if breaker is None:

            async def model(inputs: Arrays, deadline: float | None) -> Arrays:
                return await batcher.submit(inputs, deadline=deadline, wait=False, abandon=True)

        else:

            async def model(inputs: Arrays, deadline: float | None) -> Arrays:
                probe = breaker.acquire()
                started = time.monotonic()
                try:
                    outputs = await batcher.submit(
                        inputs, deadline=deadline, wait=False, abandon=True
                    )
                except BaseException as exc:
                    breaker.release(probe, exc, time.monotonic() - started)
                    raise
                breaker.release(probe, None, time.monotonic() - started)
                return outputs

        cache = self.cache
        if cache is None:
            return model
        name, version, uncached = self.name, self.version, model

        async def cached(inputs: Arrays, deadline: float | None) -> Arrays:
            return await cache.predict(name, version, inputs, lambda rows: uncached(rows, deadline))

        return cached

    def _compose(self, primary: Callable[[Arrays, float | None], Awaitable[Arrays]]) -> Call:
        """The whole request path: ``primary`` alone, or as the fallback chain's first step."""
        chain = self.chain
        if chain is not None:

            async def call(inputs: Arrays, deadline: float | None) -> tuple[Arrays, str | None]:
                answer = await chain.predict(inputs, deadline=deadline)
                return answer.outputs, answer.step

            return call
        if self.breaker is None and self.cache is None:
            return self._submit

        async def alone(inputs: Arrays, deadline: float | None) -> tuple[Arrays, str | None]:
            return await primary(inputs, deadline), None

        return alone


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "datatype": oip_datatype(spec.dtype),
        "shape": [-1 if d is None else d for d in spec.shape],
    }


class Inference(NamedTuple):
    """An answer of :meth:`ModelServer.infer`: the model that answered, its outputs, and the
    fallback step that produced them (``None`` when the model has no fallback chain)."""

    served: ServedModel
    outputs: Arrays
    step: str | None


class ModelServer:
    """Named models behind micro-batchers; start them all, infer on one, close them all.

    ``batching`` holds the :class:`MicroBatcher` keyword arguments used for every
    model added without a batcher of its own. Several versions of one name may be
    served; the last one added answers requests that name no version.

    The protections every request meets (see ``docs/resilience.md``), server-wide:
    ``max_concurrency``, the ceiling of each model's adaptive concurrency limit (``0``: no
    limiter); ``latency_target``, the call time (seconds) under which a limiter never
    shrinks (``rtinfer serve``: a third of the SLO); ``default_priority`` of requests that
    name none; ``quota``, a per-client :class:`ClientQuota` (429); ``cache``, a
    :class:`PredictionCache` shared by every deterministic model. Each model's
    :class:`ModelPolicy` refines them.
    ``clock`` (monotonic seconds) drives the limiters and breakers (tests inject one).
    """

    def __init__(
        self,
        *,
        metrics: Metrics | None = None,
        batching: Mapping[str, Any] | None = None,
        max_concurrency: int = 1000,
        latency_target: float | None = None,
        default_priority: Priority = Priority.CRITICAL,
        quota: ClientQuota | None = None,
        cache: PredictionCache | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_concurrency < 0:
            raise ValueError(
                f"max_concurrency must be 0 (no limiter) or more, got {max_concurrency}"
            )
        self.metrics = metrics or Metrics()
        self._loop_lag = LoopLag(self.metrics.loop_lag)
        self.batching = dict(batching or {})
        self.max_concurrency = max_concurrency
        self.latency_target = latency_target
        self.default_priority = default_priority
        self.quota = quota
        self.cache = cache
        self.clock = clock
        self._models: dict[str, list[ServedModel]] = {}
        self.pipelines: dict[str, PipelineScorer] = {}
        self._pipeline_models: dict[str, ServedModel] = {}
        self.started = False
        #: True from :meth:`drain` on: not ready, new requests refused (503, UNAVAILABLE).
        self.draining = False
        self._in_flight = 0
        self._idle: asyncio.Event | None = None
        #: The version answering requests that name none, by model (rtinfer.repository
        #: promotes by swapping it); canary routing and shadow copies, by model.
        self._default: dict[str, ServedModel] = {}
        self.canaries: dict[str, Canary] = {}
        self.shadows: dict[str, Shadow] = {}

    def add(
        self,
        model: Model,
        *,
        name: str | None = None,
        batcher: MicroBatcher | None = None,
        policy: ModelPolicy | None = None,
    ) -> ServedModel:
        """Serve ``model`` under ``name`` (default: its own name), protected by ``policy``."""
        if self.started:
            raise RuntimeError("add models before start(); the request paths are built then")
        served = ServedModel(
            name or model.name,
            model,
            batcher or MicroBatcher(model, metrics=self.metrics, **self.batching),
            policy,
        )
        if policy is None or policy.priority is None:
            served.priority = self.default_priority
        self._models.setdefault(served.name, []).append(served)
        self._default[served.name] = served
        return served

    def add_pipeline(self, scorer: PipelineScorer, *, policy: ModelPolicy | None = None) -> None:
        """Serve a pipeline's stages for requests; its model is served too, sharing its batcher."""
        if scorer.name in self.pipelines:
            raise ValueError(f"a pipeline named {scorer.name!r} is already served")
        self.pipelines[scorer.name] = scorer
        served = self.add(scorer.batcher.model, batcher=scorer.batcher, policy=policy)
        # One breaker for one model: what fails on the stream or the pipeline's route
        # fails for the model's route too (and one state is exported under its name).
        served.breaker = scorer.breaker
        self._pipeline_models[scorer.name] = served

    def pipeline(self, name: str) -> PipelineScorer:
        """The served pipeline ``name``, or ModelNotFound."""
        try:
            return self.pipelines[name]
        except KeyError:
            known = ", ".join(sorted(self.pipelines)) or "none"
            raise ModelNotFound(f"unknown pipeline {name!r}; served here: {known}") from None

    def all(self) -> list[ServedModel]:
        return [served for versions in self._models.values() for served in versions]

    async def start(self) -> None:
        """Load and warm up every model (concurrently, each on its own thread), then build
        each model's request path (limiter, breaker, cache, fallback chain) once."""
        await asyncio.gather(*(s.batcher.start() for s in self.all()))
        for versions in self._models.values():
            for served in versions:
                self._protect(served, several=len(versions) > 1)
        for name, scorer in self.pipelines.items():
            scorer.share_limiter(self._pipeline_models[name].limiter)
            await scorer.start()
        self._loop_lag.start()
        self.started = True

    def _calm(self) -> bool:
        """The event loop kept time at its latest sample: no queue of work in front of
        it (a limiter forgets an overload only while it is so)."""
        return self._loop_lag.last < CALM_LAG_S

    def _protect(self, served: ServedModel, *, several: bool) -> None:
        policy = served.policy
        label = f"{served.name}@{served.version}" if several else served.name
        ceiling = self.max_concurrency if policy.max_concurrency is None else policy.max_concurrency
        if ceiling > 0:
            initial = min(ceiling, max(20, served.batcher.max_batch_size))
            served.limiter = AdaptiveLimiter(
                label, initial_limit=initial, max_limit=ceiling, clock=self.clock,
                latency_target=self.latency_target, calm=self._calm, metrics=self.metrics,
            )  # fmt: skip
        if policy.breaker and served.breaker is None:  # a pipeline's model brings its own
            served.breaker = CircuitBreaker(
                f"model:{label}",
                consecutive_failures=policy.breaker_failures,
                open_seconds=policy.breaker_open_s,
                is_failure=model_failure,
                clock=self.clock,
                metrics=self.metrics,
            )
        if self.cache is not None and policy.cache and served.deterministic:
            served.cache = self.cache
        primary = served._primary()
        if policy.has_fallback:
            steps = [Step(PRIMARY, primary)]
            if policy.fallback_model is not None:
                light = self.get(policy.fallback_model)
                if light is served:
                    raise ConfigError(
                        f"model {served.name!r} names itself as its fallback model; name a "
                        "lighter model served beside it"
                    )
                steps.append(self._fallback_step(light.name))
            if policy.rules is not None:
                steps.append(Step.rules("rules", policy.rules))
            if policy.default is not None:
                dtypes = {spec.name: spec.dtype for spec in served.model.outputs}
                row = {k: np.asarray(v, dtype=dtypes.get(k)) for k, v in policy.default.items()}
                steps.append(Step.default("default", row))
            served.chain = FallbackChain(label, steps, metrics=self.metrics)
        served.call = served._compose(primary)

    async def aclose(self) -> None:
        """Finish the queued requests, then stop every model's threads."""
        self.started = False
        self._loop_lag.stop()
        for scorer in self.pipelines.values():
            await scorer.aclose()
        await asyncio.gather(*(s.batcher.aclose() for s in self.all()))
        if self.cache is not None:
            await self.cache.aclose()

    @property
    def ready(self) -> bool:
        """Every model is loaded, warmed up and taking requests (false while draining)."""
        return (
            self.started
            and not self.draining
            and all(s.ready for s in self.all())
            and all(p.ready for p in self.pipelines.values())
        )

    @property
    def in_flight(self) -> int:
        """Requests admitted (by :meth:`infer` or :meth:`score`) and not yet answered."""
        return self._in_flight

    async def drain(self, within: float | None) -> bool:
        """Turn not ready, refuse new requests, and wait for those in flight to finish.

        Waits at most ``within`` seconds (``None``: no bound); returns whether every
        request in flight finished. New requests get :class:`Closed` (HTTP 503 with
        ``Retry-After``, gRPC ``UNAVAILABLE``) from now on.
        """
        self.draining = True
        if self._in_flight == 0:
            return True
        self._idle = idle = asyncio.Event()
        try:
            async with asyncio.timeout(within):
                await idle.wait()
        except TimeoutError:
            return False
        return True

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """The served model ``name`` (its latest version unless ``version``), or ModelNotFound."""
        versions = self._models.get(name)
        if not versions:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"unknown model {name!r}; served here: {known}")
        if not version:
            return self._default.get(name) or versions[-1]
        for served in versions:
            if served.version == version:
                return served
        have = ", ".join(s.version for s in versions)
        raise ModelNotFound(f"model {name!r} has no version {version!r}; it has {have}")

    # -- versions while serving (rtinfer.repository.ModelManager drives these) ----------

    def route(
        self, name: str, version: str | None = None, *, key: str | bytes | None = None
    ) -> ServedModel:
        """The version that answers a request: the one it names, else the default, or,
        while the model has a canary, the candidate for its share (by routing ``key``)."""
        served = self.get(name, version)
        if version or not self.canaries:
            return served
        canary = self.canaries.get(name)
        return served if canary is None else canary.pick(served, key)

    async def install(
        self,
        model: Model,
        *,
        name: str | None = None,
        batcher: MicroBatcher | None = None,
        policy: ModelPolicy | None = None,
    ) -> ServedModel:
        """Serve one more version on a started server: loaded and warmed up first (on its
        model thread), then reachable. It answers the requests naming its version; those
        naming none only if it is the model's first version (else see :meth:`promote`)."""
        if not self.started:
            return self.add(model, name=name, batcher=batcher, policy=policy)
        served = ServedModel(
            name or model.name,
            model,
            batcher or MicroBatcher(model, metrics=self.metrics, **self.batching),
            policy,
        )
        if policy is None or policy.priority is None:
            served.priority = self.default_priority
        await served.batcher.start()
        try:
            if any(s.version == served.version for s in self._models.get(served.name, ())):
                raise ValueError(f"model {served.name!r} already serves version {served.version!r}")
            self._protect(served, several=True)
        except BaseException:
            await served.batcher.aclose()
            raise
        self._models.setdefault(served.name, []).append(served)
        self._default.setdefault(served.name, served)
        return served

    def promote(self, name: str, version: str) -> ServedModel:
        """Make ``version`` answer the requests naming none, at once (one reference swap
        on the event loop: requests already resolved finish on the previous default).
        Returns the previous default."""
        served = self.get(name, version)
        previous = self.get(name)
        self._default[name] = served
        return previous

    def withdraw(self, name: str, version: str) -> ServedModel:
        """Stop serving a version: later lookups do not find it; the caller closes its
        batcher. If it was the default, the last added version left becomes the default."""
        served = self.get(name, version)
        versions = self._models[name]
        versions.remove(served)
        if not versions:
            del self._models[name]
            self._default.pop(name, None)
        elif self._default.get(name) is served:
            self._default[name] = versions[-1]
        return served

    def _fallback_step(self, name: str) -> Step:
        """A fallback model step following promotions: the model's default at each call."""
        get = self.get

        async def run(inputs: Arrays, deadline: float | None) -> Arrays:
            return await get(name).batcher.submit(
                inputs, deadline=deadline, wait=False, abandon=True
            )

        return Step(f"model:{name}", run)

    def _mirror(
        self, served: ServedModel, inputs: Arrays, outputs: Arrays, step: str | None
    ) -> None:
        """Offer the default's answer to the model's shadow (never awaited, never raises)."""
        shadow = self.shadows.get(served.name)
        default = self._default.get(served.name)
        if shadow is not None and step in (None, PRIMARY) and default is served:
            shadow.offer(inputs, outputs, served)

    def _admit(
        self, served: ServedModel, priority: Priority | None, client: str | None
    ) -> Permit | None:
        """Refuse a request at once (draining, quota, limiter) or count it in flight."""
        if self.draining:
            raise Closed("the server is draining before it stops")
        if client is not None and self.quota is not None:
            self.quota.check(client)
        limiter = served.limiter
        permit = None if limiter is None else limiter.try_acquire(priority or served.priority)
        self._in_flight += 1
        return permit

    def _finish(self, permit: Permit | None, error: BaseException | None) -> None:
        if permit is not None:
            if error is None:
                permit.release()
            else:
                permit.release(ok=False, dropped=isinstance(error, TimeoutError | DeadlineExceeded))
        self._in_flight -= 1
        if self._idle is not None and self._in_flight == 0:
            self._idle.set()

    def admit(
        self, served: ServedModel, priority: Priority | None = None, client: str | None = None
    ) -> Admission:
        """Admit a request to ``served`` before its body is read and decoded.

        A refusal (draining, quota, limiter) is raised at once and so costs the least it
        can; an admitted request is counted in flight until it is passed to :meth:`infer`
        (``admission=``), which releases it, or to :meth:`release` if it never gets there.
        """
        return Admission(self._admit(served, priority, client))

    def release(self, admission: Admission, error: BaseException | None) -> None:
        """Let go of an admission that never reached :meth:`infer` (a bad body, say)."""
        if not admission.done:
            admission.done = True
            self._finish(admission.permit, error)

    async def infer(
        self,
        name: str,
        inputs: Arrays,
        *,
        version: str | None = None,
        deadline: float | None = None,
        priority: Priority | None = None,
        client: str | None = None,
        admission: Admission | None = None,
    ) -> Inference:
        """Run ``inputs`` through the model's protected path; fail fast when it is full.

        ``deadline``: a ``time.time()`` instant; the batcher never runs the request after
        it, and fails it with :class:`DeadlineExceeded` when it passes while the model
        runs (the caller needs no timer of its own). ``priority``: its traffic class
        (``None``: the model's default). ``client``: who asks, for the per-client quota
        (``None``: not counted). Refusals are at once:
        :class:`Closed` while draining, :class:`QuotaExceeded` (429),
        :class:`Overloaded` (503) from the limiter, a full queue or an open breaker.
        ``admission``: the request was admitted already (:meth:`admit`); it is released here.
        """
        try:
            served = self.get(name, version)
            rows = next((len(a) for a in inputs.values()), 0)
            if rows > served.batcher.max_queue_rows:  # could never fit: no use retrying
                raise ModelInputError(
                    f"the request has {rows} rows; model {served.name!r} takes at most "
                    f"{served.batcher.max_queue_rows} per request (its max_queue_rows); split it"
                )
        except BaseException as exc:
            if admission is not None:
                self.release(admission, exc)
            raise
        if admission is None:
            permit = self._admit(served, priority, client)
        else:
            admission.done = True
            permit = admission.permit
        service = token = None
        if permit is not None:
            service = ServiceTime()
            token = SERVICE_TIME.set(service)
        try:
            outputs, step = await served.call(inputs, deadline)
        except BaseException as exc:
            self._finish(permit, exc)
            raise
        finally:
            if token is not None:
                SERVICE_TIME.reset(token)
        if permit is not None and service is not None and step in (None, PRIMARY):
            permit.service = service.seconds  # the model's own answer (not a fallback's)
        self._finish(permit, None)
        if self.shadows:
            self._mirror(served, inputs, outputs, step)
        return Inference(served, outputs, step)

    async def score(
        self,
        name: str,
        body: bytes,
        *,
        deadline: float | None = None,
        priority: Priority | None = None,
        client: str | None = None,
    ) -> list[Any]:
        """The pipeline ``name``'s results for the events in ``body``, admitted as :meth:`infer`."""
        scorer = self.pipeline(name)
        permit = self._admit(self._pipeline_models[name], priority, client)
        try:
            results = await scorer.score(body, deadline=deadline)
        except BaseException as exc:
            self._finish(permit, exc)
            raise
        self._finish(permit, None)
        return results


class Admission:
    """A request admitted before its body was read (:meth:`ModelServer.admit`)."""

    __slots__ = ("done", "permit")

    def __init__(self, permit: Permit | None) -> None:
        self.permit = permit
        self.done = False  # released, or handed to infer (which releases it)


def deadline_from_timeout(timeout_s: float | None) -> float | None:
    """A ``time.time()`` deadline ``timeout_s`` from now (``None``: no deadline)."""
    return None if timeout_s is None else time.time() + timeout_s
