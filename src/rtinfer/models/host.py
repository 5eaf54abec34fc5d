"""Models in a process of their own, called by the serving workers: the model host.

``rtinfer serve TARGET --workers N --model-process`` loads each model once, in a host
process, and every worker calls it through a :class:`HostedModel`. The workers keep
all the serving: HTTP, admission, deadlines, batching, a repository's versions,
canaries and watch, a pipeline's stages. Only their batches cross to the host, one
message each way, so the crossing's cost is shared by a batch's rows, and the batches
that wait while the model runs are merged into one call.

A worker's :class:`HostedModel` names its model file when it connects: the host loads
a file the first time a worker names it, and lets it go when the last connection
naming it has closed (a version unloaded by every worker).

Why: a worker's front can refuse only so many requests a second (each costs tens of
microseconds of its event loop), and a worker per model thread ties the fronts'
number to the model's. With a host the two are sized apart: enough fronts to refuse
ten times what the model answers, and ``threads`` batches running in the model at
once. It also keeps one copy of a large model, and one user of an accelerator.

The wire: a Unix socket in a private folder, through
:mod:`multiprocessing.connection` (length-prefixed messages; the ``authkey``'s HMAC
handshake when a worker connects). Messages are msgpack: a tensor is its name, dtype,
shape and raw bytes (strings as a list). Nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from ..exceptions import DeadlineExceeded, ModelError, ModelInputError, ModelLoadError
from ..types import Arrays, Loader, Model, TensorSpec
from .base import CALL_DEADLINE, example_inputs, rows_of

__all__ = ["HostProcess", "HostedModel", "ModelHost", "hosted_loader"]

log = logging.getLogger("rtinfer.models.host")


class _Tensor(msgspec.Struct, array_like=True):
    name: str
    dtype: str
    shape: list[int]
    data: bytes | list[str]  # raw bytes; the items of a string tensor


class _Spec(msgspec.Struct, array_like=True):
    name: str
    dtype: str
    shape: list[int | None]


class _Open(msgspec.Struct, array_like=True):
    """What a worker says first on a connection: the model it calls (``path`` ``None``:
    the host's own model), built as :func:`~rtinfer.models.load_model` would build it."""

    path: str | None
    name: str | None = None
    version: str | None = None
    options: dict[str, Any] = {}


class _Hello(msgspec.Struct, array_like=True):
    """The host's answer to :class:`_Open`: the model, or why it cannot be served."""

    name: str
    version: str
    inputs: list[_Spec]
    outputs: list[_Spec]
    error: str | None = None


class _Answer(msgspec.Struct, array_like=True):
    tensors: list[_Tensor] = []
    error: str | None = None
    input_error: bool = False
    expired: bool = False  # its deadline passed while it waited in the host: not run


class _Request(msgspec.Struct, array_like=True):
    """A worker's call: its batch, and the latest of its requests' deadlines (``None``:
    one has none), after which the host does not run it."""

    tensors: list[_Tensor]
    deadline: float | None = None


_encode = msgspec.msgpack.Encoder().encode
_decode_call = msgspec.msgpack.Decoder(_Request).decode
_decode_answer = msgspec.msgpack.Decoder(_Answer).decode
_decode_hello = msgspec.msgpack.Decoder(_Hello).decode
_decode_open = msgspec.msgpack.Decoder(_Open).decode
_options_key = msgspec.json.Encoder(order="sorted").encode


def _tensors(arrays: Arrays) -> list[_Tensor]:
    out = []
    for name, array in arrays.items():
        if array.dtype.kind == "O":
            data: bytes | list[Any] = array.ravel().tolist()
        else:
            data = np.ascontiguousarray(array).tobytes()
        out.append(_Tensor(name, array.dtype.str, list(array.shape), data))
    return out


def _arrays(tensors: list[_Tensor]) -> Arrays:
    """Writable arrays (one copy of each buffer), as the model would get them in-process."""
    out: dict[str, np.ndarray[Any, Any]] = {}
    for t in tensors:
        if isinstance(t.data, list):
            array = np.empty(len(t.data), dtype=object)
            array[:] = t.data
        else:
            array = np.frombuffer(bytearray(t.data), dtype=np.dtype(t.dtype))
        out[t.name] = array.reshape(t.shape)
    return out


def _spec_out(spec: TensorSpec) -> _Spec:
    return _Spec(spec.name, spec.dtype.str, list(spec.shape))


def _spec_in(spec: _Spec) -> TensorSpec:
    return TensorSpec(spec.name, np.dtype(spec.dtype), tuple(spec.shape))


class ModelHost:
    """Serves models on a Unix socket at ``address`` to :class:`HostedModel` s.

    ``model``: a loaded model served to the connections that name no file. ``load``
    (:func:`~rtinfer.models.load_model`'s signature): how a model file a connection
    names is built, under ``root`` only (a file, or a folder such as a repository; or
    several, such as the model files of a pipeline); it is loaded once for every
    connection naming the same file (and name, version and options), and let go when
    the last of them closes.

    Each connection (a worker's model thread) gets a thread here; at most ``threads``
    calls run at once, whatever their model. ONNX Runtime releases the GIL while it
    runs, so ``threads`` above 1 uses as many cores. Calls to one model that wait
    meanwhile are run as one (``merge``, up to ``max_rows`` rows): each worker batches
    its own requests, and several workers' batches would otherwise reach the model
    smaller than one worker's did. A merged call that fails is run again call by call,
    so a failure stays with the worker whose rows caused it.
    """

    def __init__(
        self,
        model: Model | None,
        address: str,
        authkey: bytes,
        *,
        load: Loader | None = None,
        root: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
        threads: int = 1,
        merge: bool = True,
        max_rows: int = 256,
    ) -> None:
        if threads < 1:
            raise ValueError(f"a model host runs at least one call at once, got {threads}")
        self._default = None if model is None else _Slot(None, model)
        self._load = load
        # Paths are compared as written (made absolute, ".." folded), not resolved: a
        # repository whose version folders link elsewhere is still served.
        roots = [root] if isinstance(root, str | os.PathLike) else list(root or [])
        if load is not None and not roots:
            raise ValueError("a model host that loads files needs the root they must lie under")
        self._roots = [Path(os.path.abspath(r)) for r in roots]
        self.address = address
        self._threads = threads
        self._merge = merge
        self._max_rows = max_rows
        self._ready = threading.Condition(threading.Lock())
        self._waiting: deque[_Call] = deque()
        self._running = 0
        #: Model calls run, and the callers' calls they answered (merged: more of these).
        self.runs = 0
        self.calls = 0
        #: Calls not run: their deadline passed while they waited.
        self.expired = 0
        #: Model files loaded, and let go (no connection named them any more).
        self.loads = 0
        self.unloads = 0
        self._models: dict[tuple[Any, ...], _Slot] = {}
        self._listener = Listener(address, family="AF_UNIX", authkey=authkey)
        self._closed = threading.Event()
        self._connections: set[Connection] = set()
        self._lock = threading.Lock()

    @property
    def models(self) -> list[tuple[str, str]]:
        """The name and version of each model file loaded now."""
        with self._lock:
            return [s.hello_of() for s in self._models.values() if s.model is not None]

    def serve_forever(self) -> None:
        """Accept workers until :meth:`close`; each is served on a thread of its own."""
        while not self._closed.is_set():
            try:
                connection = self._listener.accept()
            except Exception as exc:  # a caller without the key, or one that hung up early
                if self._closed.is_set():
                    return
                log.warning("refused a connection to the model host: %s", exc)
                continue
            with self._lock:
                self._connections.add(connection)
            threading.Thread(
                target=self._serve, args=(connection,), name="rtinfer-host-call", daemon=True
            ).start()

    def start(self) -> threading.Thread:
        """:meth:`serve_forever` on a daemon thread, returned."""
        thread = threading.Thread(target=self.serve_forever, name="rtinfer-host", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Stop accepting and hang up on every worker (their calls fail and reconnect)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._listener.close()  # and removes the socket's file
        with self._lock:
            for connection in self._connections:
                # Shut down, not closed: its thread, blocked reading it, reads the end
                # and closes it (a Connection closed under a reader breaks the reader).
                with (
                    contextlib.suppress(OSError),
                    socket.socket(fileno=os.dup(connection.fileno())) as sock,
                ):
                    sock.shutdown(socket.SHUT_RDWR)

    @property
    def waiting(self) -> int:
        """Calls waiting for a model now."""
        return len(self._waiting)

    def hold(self, path: str | os.PathLike[str]) -> None:
        """Load the model file at ``path`` now, and keep it while the host runs: the one
        that connections naming it (with no name, version or options) get, and those
        naming no file if the host had no model of its own."""
        slot = self.open(_Open(str(path)))
        if self._default is None:
            self._default = slot

    def open(self, spec: _Open) -> _Slot:
        """The model a connection names, loaded if no other connection has it; raises
        :class:`ModelLoadError`. Each open is matched by a :meth:`_release`."""
        if spec.path is None:
            if self._default is None:
                raise ModelLoadError("this model host has no model of its own: name a file")
            return self._default
        if self._load is None or not self._roots:
            raise ModelLoadError("this model host serves its own model only; it loads no file")
        path = Path(os.path.abspath(spec.path))
        if not any(path.is_relative_to(root) for root in self._roots):
            where = ", ".join(repr(str(r)) for r in self._roots)
            raise ModelLoadError(
                f"{str(path)!r} lies outside {where}, the only place"
                f"{'s' if len(self._roots) > 1 else ''} this model host loads from"
            )
        try:
            stat = path.stat()
        except OSError as exc:
            raise ModelLoadError(
                f"the model host could not load {str(path)!r}: {exc.strerror or exc}"
            ) from exc
        # A file changed in place is another model: loaded beside the one still in use.
        key = (
            str(path), stat.st_size, stat.st_mtime_ns, spec.name, spec.version,
            _options_key(spec.options),
        )  # fmt: skip
        with self._lock:
            slot = self._models.get(key)
            first = slot is None
            if slot is None:
                slot = self._models[key] = _Slot(key, None)
            slot.users += 1
        if first:
            try:
                model = self._load(path, name=spec.name, version=spec.version, **spec.options)
                model.load()
                model.warmup([1])
                slot.serve(model)
                with self._lock:
                    self.loads += 1
                log.info("the model host loaded %s (version %s)", model.name, model.version)
            except Exception as exc:
                slot.error = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    self._models.pop(key, None)
            finally:
                slot.loaded.set()
        else:
            slot.loaded.wait()
        if slot.error is not None:
            self._release(slot)
            raise ModelLoadError(f"the model host could not load {str(path)!r}: {slot.error}")
        return slot

    def _release(self, slot: _Slot) -> None:
        with self._lock:
            slot.users -= 1
            if slot.users or slot.key is None or self._models.get(slot.key) is not slot:
                return
            del self._models[slot.key]
            if slot.model is None:
                return
            self.unloads += 1
        log.info("the model host let go of %s (version %s)", *slot.hello_of())

    def predict(
        self, inputs: Arrays, slot: _Slot | None = None, deadline: float | None = None
    ) -> Arrays:
        """The answer of ``slot``'s model (``None``: the host's own) to ``inputs``, run
        alone or merged with other waiting calls to it; :class:`DeadlineExceeded`, and
        not run, when ``deadline`` (``time.time()``) passes while it waits."""
        slot = slot or self._default
        if slot is None or slot.model is None:
            raise ModelError("this model host has no model of its own")
        call = _Call(slot.model, inputs, deadline)
        ready = self._ready
        with ready:
            self._waiting.append(call)
            while not call.done:
                if call.taken or self._running >= self._threads:
                    ready.wait()  # for its answer, or a free slot
                    continue
                # A free slot: this thread runs what waits, its own call among the first.
                calls = self._take()
                self._running += 1
                self.calls += len(calls)
                runs = 1
                ready.release()
                try:
                    runs = self._run(calls)
                finally:
                    ready.acquire()
                    self._running -= 1
                    self.runs += runs
                    for done in calls:
                        done.done = True
                        if isinstance(done.error, DeadlineExceeded):
                            self.expired += 1
                    ready.notify_all()
        if call.error is not None:
            raise call.error
        assert call.outputs is not None
        return call.outputs

    def _take(self) -> list[_Call]:
        """The first waiting call and, merging, the calls after it to the same model with
        the same tensors (in their order; the others keep theirs)."""
        waiting = self._waiting
        first = waiting.popleft()
        calls = [first]
        if self._merge and waiting:
            rows, kind, full = first.rows, first.kind, False
            others: list[_Call] = []
            while waiting:
                call = waiting.popleft()
                if not full and call.kind == kind:
                    if rows + call.rows <= self._max_rows:
                        rows += call.rows
                        calls.append(call)
                        continue
                    full = True  # a later, smaller call must not pass this one
                others.append(call)
            waiting.extend(others)
        for call in calls:
            call.taken = True
        return calls

    def _run(self, calls: list[_Call]) -> int:
        """Answer ``calls``, merged if several; how many model calls that took. Those
        whose deadline passed while they waited are not run (nobody waits for them)."""
        now = time.time()
        if any(c.deadline is not None and c.deadline <= now for c in calls):
            for call in calls:
                if call.deadline is not None and call.deadline <= now:
                    call.error = DeadlineExceeded(
                        f"deadline passed after {1e3 * (now - call.arrived):.1f} ms waiting "
                        "in the model host; the batch was not run"
                    )
            calls = [c for c in calls if c.error is None]
            if not calls:
                return 0
        predict = calls[0].model.predict
        if len(calls) > 1:
            names = list(calls[0].inputs)
            merged = {n: np.concatenate([c.inputs[n] for c in calls]) for n in names}
            try:
                outputs = predict(merged)
                total = sum(c.rows for c in calls)
                if any(a.shape[:1] != (total,) for a in outputs.values()):
                    raise ModelError("the model's outputs are not one row per input row")
            except Exception:  # run each alone: the error, if any, is its own caller's
                for call in calls:
                    _answer(call, predict)
                return 1 + len(calls)
            start = 0
            for call in calls:
                end = start + call.rows
                call.outputs = {name: array[start:end] for name, array in outputs.items()}
                start = end
            return 1
        _answer(calls[0], predict)
        return 1

    def _serve(self, connection: Connection) -> None:
        predict = self.predict
        slot: _Slot | None = None
        try:
            try:
                slot = self.open(_decode_open(connection.recv_bytes()))
            except (ModelLoadError, msgspec.DecodeError) as exc:
                connection.send_bytes(_encode(_Hello("", "", [], [], error=str(exc))))
                return
            connection.send_bytes(slot.hello)
            while True:
                message = connection.recv_bytes()
                try:
                    request = _decode_call(message)
                    outputs = predict(_arrays(request.tensors), slot, request.deadline)
                    answer = _encode(_Answer(_tensors(outputs)))
                except ModelInputError as exc:
                    answer = _encode(_Answer(error=str(exc), input_error=True))
                except DeadlineExceeded as exc:
                    answer = _encode(_Answer(error=str(exc), expired=True))
                except Exception as exc:  # the worker's breaker and fallback decide
                    answer = _encode(_Answer(error=f"{type(exc).__name__}: {exc}"))
                connection.send_bytes(answer)
        except (EOFError, OSError):  # the worker went away
            pass
        finally:
            if slot is not None:
                self._release(slot)
            with self._lock:
                self._connections.discard(connection)
            with contextlib.suppress(OSError):
                connection.close()


class _Slot:
    """A model the host serves: its own, or a file connections named (``key``), with
    how many of them use it."""

    __slots__ = ("error", "hello", "key", "loaded", "model", "users")

    def __init__(self, key: tuple[Any, ...] | None, model: Model | None) -> None:
        self.key = key
        self.model: Model | None = None
        self.hello = b""
        self.error: str | None = None
        self.loaded = threading.Event()
        self.users = 0
        if model is not None:
            self.serve(model)

    def serve(self, model: Model) -> None:
        self.hello = _encode(
            _Hello(
                model.name,
                model.version,
                [_spec_out(s) for s in model.inputs],
                [_spec_out(s) for s in model.outputs],
            )
        )
        self.model = model
        self.loaded.set()

    def hello_of(self) -> tuple[str, str]:
        assert self.model is not None
        return self.model.name, self.model.version


class _Call:
    """One caller's inputs waiting for a model, and then its answer."""

    __slots__ = (
        "arrived", "deadline", "done", "error", "inputs", "kind", "model", "outputs", "rows",
        "taken",
    )  # fmt: skip

    def __init__(self, model: Model, inputs: Arrays, deadline: float | None = None) -> None:
        self.model = model
        self.inputs = inputs
        self.deadline = deadline
        self.arrived = time.time()
        self.rows = rows_of(inputs)
        # Calls merge only to the same model, with the same tensors: names, dtypes,
        # shapes past the rows.
        self.kind = (id(model), *((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items()))
        self.outputs: Arrays | None = None
        self.error: BaseException | None = None
        self.taken = False  # by a thread that runs it
        self.done = False


def _answer(call: _Call, predict: Any) -> None:
    try:
        call.outputs = predict(call.inputs)
    except Exception as exc:
        call.error = exc


class HostedModel:
    """A model that a :class:`ModelHost` runs, called from this process.

    ``path`` (with ``name``, ``version`` and ONNX Runtime ``options``, as
    :func:`~rtinfer.models.load_model` takes them): the model file the host loads for
    it; ``None``: the host's own model. It is a :data:`~rtinfer.types.Model` like any
    other: the batcher calls :meth:`predict` on its model threads, each of which keeps a
    connection of its own (closed when the thread ends: a version's batcher closed by
    every worker lets the host unload it). :meth:`load` connects and learns the model's
    name, version and tensors from the host. A call that cannot reach the host raises
    :class:`ModelError` (the breaker and the fallback chain see a failing model), and
    the next call connects again.
    """

    def __init__(
        self,
        address: str,
        authkey: bytes,
        *,
        path: str | os.PathLike[str] | None = None,
        name: str | None = None,
        version: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.address = address
        self._authkey = authkey
        self._open = _encode(
            _Open(None if path is None else str(path), name, version, dict(options or {}))
        )
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        # What the host says replaces these; known before, for the routes.
        self._name = name or (Path(path).stem if path is not None else "hosted")
        self._version = version or "unloaded"
        self._local = threading.local()

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return self._version

    def load(self) -> None:
        try:
            self._connection()
        except ModelLoadError:
            raise
        except ModelError as exc:
            raise ModelLoadError(str(exc)) from exc

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        """One call of the smallest size: the host warmed the model up when it loaded it,
        and every call runs on the model threads that serve every worker, so a batch of
        each size up to 256 rows held up the versions serving beside this one (measured,
        ``benchmarks/update.py --model-process``: 31-118 requests past their deadline at
        each load, none with one call)."""
        for rows in sorted(batch_sizes)[:1]:
            self.predict(example_inputs(self.inputs, rows))

    def predict(self, inputs: Arrays) -> Arrays:
        """The host's answer; the batch's deadline (:func:`~rtinfer.batching.call_deadline`)
        goes with it, so that a batch that waited there past it is not run."""
        connection = self._connection()
        try:
            connection.send_bytes(_encode(_Request(_tensors(inputs), CALL_DEADLINE.get())))
            answer = _decode_answer(connection.recv_bytes())
        except (EOFError, OSError) as exc:
            self._hang_up()
            raise ModelError(
                f"model {self._name!r}: the model host at {self.address} hung up "
                f"({type(exc).__name__}); the next call connects again"
            ) from exc
        if answer.expired:
            raise DeadlineExceeded(f"model {self._name!r}: {answer.error}")
        if answer.error is not None:
            kind = ModelInputError if answer.input_error else ModelError
            raise kind(f"model {self._name!r} failed in its host: {answer.error}")
        return _arrays(answer.tensors)

    def _connection(self) -> Connection:
        connection: Connection | None = getattr(self._local, "connection", None)
        if connection is not None:
            return connection
        try:
            connection = Client(self.address, family="AF_UNIX", authkey=self._authkey)
            connection.send_bytes(self._open)
            hello = _decode_hello(connection.recv_bytes())
        except (OSError, EOFError) as exc:
            raise ModelError(
                f"cannot reach the model host at {self.address}: {exc}; is it running?"
            ) from exc
        except Exception as exc:  # multiprocessing's AuthenticationError, a foreign peer
            raise ModelError(
                f"the model host at {self.address} refused this process ({exc}); "
                f"the key must be the host's"
            ) from exc
        if hello.error is not None:
            connection.close()
            raise ModelLoadError(hello.error)
        self._name, self._version = hello.name, hello.version
        self.inputs = [_spec_in(s) for s in hello.inputs]
        self.outputs = [_spec_in(s) for s in hello.outputs]
        self._local.connection = connection
        return connection

    def _hang_up(self) -> None:
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            with contextlib.suppress(OSError):
                connection.close()

    def __repr__(self) -> str:
        return f"<HostedModel {self._name!r} version={self._version!r} at {self.address!r}>"


def hosted_loader(address: str, authkey: bytes) -> Callable[..., HostedModel]:
    """A stand-in for :func:`~rtinfer.models.load_model` in a worker: the models it builds
    are loaded in the host at ``address`` (whose own ``allow_pickle`` decides, not the
    caller's)."""

    def load(
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        version: str | None = None,
        allow_pickle: bool = False,
        **options: Any,
    ) -> HostedModel:
        # Absolute here: the host compares it with the files it may load.
        return HostedModel(
            address, authkey, path=os.path.abspath(path), name=name, version=version,
            options=options,
        )  # fmt: skip

    return load


#: A host that ran at least this long before it died is started again at once; one that
#: died sooner is started this long after its start, so a model that cannot run does not spin.
STEADY_S = 10.0


class HostProcess:
    """A :class:`ModelHost` in a child process, for a model file, a model repository
    folder or a pipeline file (``path``): started, kept, stopped.

    It loads only the file, what lies in the folder, or the model files the pipeline
    names by ``path`` (its model and its fallback models; each with the pipeline's
    ``allow_pickle`` for it). A model file is loaded when the host starts, before
    :meth:`start` returns; a repository's versions and a pipeline's models are loaded
    as the workers name them (with the name, version and options they give).

    The socket lies in a private temporary folder, and the ``authkey`` is random: only
    this process and its children (which inherit :attr:`address` and :attr:`authkey`)
    can call the model. The host ignores SIGINT and SIGTERM, so that the workers can
    finish their requests through it while they drain; it exits when :meth:`stop` is
    called or this process ends. A host that dies meanwhile is started again (the
    workers' calls fail until it is back, and their next calls connect to the new one).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, allow_pickle: bool = False, threads: int = 1
    ) -> None:
        if threads < 1:
            raise ValueError(f"a model host runs at least one call at once, got {threads}")
        # Resolved, as rtinfer serve resolves the TARGET it hands the workers: the paths
        # they name lie under it as written.
        self.path = str(Path(path).resolve())
        if not Path(path).exists():
            raise ModelLoadError(
                f"{self.path!r}: no model file, repository folder or pipeline file there"
            )
        # What it may load, what it loads at each start, and which of them may be pickles.
        self._roots, self._hold, self._pickles = [self.path], [self.path], set[str]()
        if Path(path).is_dir():
            self._hold = []
        elif Path(path).suffix in (".yaml", ".yml"):
            from ..build import model_files
            from ..config import load_config

            files = model_files(load_config(path))
            if not files:
                raise ModelLoadError(
                    f"{self.path!r} names no model file by path (a factory's model is built "
                    f"in each worker): there is nothing for a model process to load"
                )
            self._roots, self._hold = [f for f, _ in files], []
            self._pickles = {f for f, pickle in files if pickle}
        self.allow_pickle = allow_pickle
        self.threads = threads
        self.authkey = os.urandom(32)
        self._folder = tempfile.mkdtemp(prefix="rtinfer-host-")  # mode 0700
        self.address = str(Path(self._folder, "model.sock"))
        self._context = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._pipe: Connection | None = None
        self._stopping = threading.Event()
        self._ending = threading.Lock()  # stop() and the watcher take the process apart
        self._watcher: threading.Thread | None = None
        self.restarts = 0
        #: Model calls the host ran, and the workers' calls they answered (more, where
        #: calls were merged); model files loaded, and let go. Counted when it stops (a
        #: host that died is not).
        self.runs = 0
        self.calls = 0
        self.loads = 0
        self.unloads = 0

    def start(self, timeout_s: float = 300.0) -> None:
        """Start the host and wait until it serves (a model file: loaded);
        :class:`ModelLoadError` if it cannot."""
        self._spawn(timeout_s)
        self._watcher = threading.Thread(target=self._watch, name="rtinfer-host-watch", daemon=True)
        self._watcher.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the host (after the workers are done with it) and remove its socket."""
        self._stopping.set()
        self._end(timeout_s)
        if self._watcher is not None:
            self._watcher.join(timeout_s)
        shutil.rmtree(self._folder, ignore_errors=True)

    def _end(self, timeout_s: float) -> None:
        """Stop the host process now running, and add up its counts."""
        with self._ending:
            process, pipe = self._process, self._pipe
            self._process = self._pipe = None
        if pipe is not None:
            with contextlib.suppress(OSError, EOFError):
                pipe.send("stop")
                if pipe.poll(timeout_s):
                    counts = pipe.recv()
                    self.runs += counts["runs"]
                    self.calls += counts["calls"]
                    self.loads += counts["loads"]
                    self.unloads += counts["unloads"]
            pipe.close()
        if process is not None:
            process.join(timeout_s)
            if process.exitcode is None:
                process.kill()
                process.join()

    def _spawn(self, timeout_s: float) -> None:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=_host_main,
            args=(
                self._roots,
                self._hold,
                self.allow_pickle,
                self._pickles,
                self.address,
                self.authkey,
                self.threads,
                theirs,
            ),
            name="rtinfer-model-host",
        )
        process.start()
        theirs.close()
        said = ours.recv() if ours.poll(timeout_s) else None
        if said != "ready":
            ours.close()
            process.kill()
            process.join()
            if said is None:
                said = f"the model host for {self.path!r} did not start within {timeout_s:.0f} s"
            raise ModelLoadError(said)
        self._process, self._pipe = process, ours

    def _watch(self) -> None:
        started = time.monotonic()
        while not self._stopping.is_set():
            process = self._process
            if process is not None:
                process.join()
                if self._stopping.is_set():
                    return
                log.error(
                    "the model host exited with %s after %.0f s; starting another",
                    process.exitcode,
                    time.monotonic() - started,
                )
                with self._ending:
                    if self._pipe is not None:
                        self._pipe.close()
                    self._process = self._pipe = None
            ran = time.monotonic() - started
            if ran < STEADY_S and self._stopping.wait(STEADY_S - ran):
                return
            started = time.monotonic()
            try:
                self._spawn(300.0)
            except ModelLoadError as exc:
                log.error("%s", exc)
                continue
            self.restarts += 1
            if self._stopping.is_set():  # stopped while this one started: stop it too
                self._end(10.0)
                return


def _host_main(
    roots: list[str],
    hold: list[str],
    allow_pickle: bool,
    pickles: set[str],
    address: str,
    authkey: bytes,
    threads: int,
    parent: Connection,
) -> None:
    """The host process: serve (the files of ``hold`` loaded first), and exit when the
    parent hangs up."""
    # The workers drain through the host: a terminal's Ctrl-C or a SIGTERM to the whole
    # group must not take the model away from them. The parent ends it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not logging.getLogger().handlers:  # its loads and unloads, beside the workers' lines
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from . import load_model

    with contextlib.suppress(FileNotFoundError):
        os.unlink(address)  # a host that died left its socket

    def load(path: str | os.PathLike[str], **options: Any) -> Model:
        options.pop("allow_pickle", None)  # the host's say, not the caller's
        pickle = allow_pickle or os.path.abspath(path) in pickles
        return load_model(path, allow_pickle=pickle, **options)

    try:
        host = ModelHost(None, address, authkey, load=load, root=roots, threads=threads)
    except Exception as exc:
        parent.send(f"the model host could not listen at {address!r}: {exc}")
        return
    for path in hold:
        try:
            host.hold(path)
        except ModelLoadError as exc:
            host.close()
            parent.send(str(exc))
            return
    host.start()
    parent.send("ready")
    with contextlib.suppress(EOFError, OSError):
        parent.recv()  # "stop", or the end of the pipe when the parent dies
    host.close()
    with contextlib.suppress(OSError):
        parent.send(
            {"runs": host.runs, "calls": host.calls, "loads": host.loads, "unloads": host.unloads}
        )
