"""Model management across worker processes: every update reaches every worker.

``rtinfer serve REPO --workers N --management-key KEY`` runs N processes sharing one
port, and a management request (load, unload, promote, canary, shadow) reaches the one
that accepted its connection. That worker does not apply it alone: it asks the
:class:`ControlHub` in the ``rtinfer serve`` process, which sends the update to every
worker (:class:`ControlMember`), waits for each to apply it, and answers with the
outcome. The updates that took are kept, in order: a worker started later (one that
replaces a worker that died) applies them before it turns ready, so that every worker
serves the same versions.

The wire is the model host's: a Unix socket in a private folder, through
:mod:`multiprocessing.connection` (a random key checked by HMAC), msgpack messages;
nothing is unpickled. An update travels as its route's action, the model's name and
the request's JSON body, which each worker decodes and applies as its own management
route would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from .errors import HttpError

if TYPE_CHECKING:
    from .manage import Management

__all__ = ["ControlHub", "ControlMember", "Update"]

log = logging.getLogger("rtinfer.http.control")

#: How long the hub waits for a worker to apply an update (loading a large model or
#: converting one can take minutes) before it counts the worker as lost.
APPLY_TIMEOUT_S = 600.0


class Update(msgspec.Struct, array_like=True):
    """One management update: the route's action, the model's name, the JSON body."""

    action: str
    name: str
    body: bytes


class _Hello(msgspec.Struct, array_like=True):
    role: str  # "member": a worker's standing connection; "ask": one update to fan out
    pid: int


class _Outcome(msgspec.Struct, array_like=True):
    status: int  # 200, or the HTTP status of the management route's error
    detail: str = ""


_encode = msgspec.msgpack.Encoder().encode
_decode_hello = msgspec.msgpack.Decoder(_Hello).decode
_decode_update = msgspec.msgpack.Decoder(Update).decode
_decode_updates = msgspec.msgpack.Decoder(list[Update]).decode
_decode_outcome = msgspec.msgpack.Decoder(_Outcome).decode
_decode_outcomes = msgspec.msgpack.Decoder(list[_Outcome]).decode


class ControlHub:
    """In the ``rtinfer serve`` process: fans each worker's update out to all of them.

    Workers find it at :attr:`address` with :attr:`authkey` (their parent passes both).
    Updates are applied one at a time, everywhere; a worker that joins applies the
    updates that took before it is counted (and before it turns ready).
    """

    def __init__(self) -> None:
        self.authkey = os.urandom(32)
        self._folder = tempfile.mkdtemp(prefix="rtinfer-control-")  # mode 0700
        self.address = str(Path(self._folder, "control.sock"))
        self._listener = Listener(self.address, family="AF_UNIX", authkey=self.authkey)
        self._members: dict[Connection, int] = {}  # a worker's standing connection: its pid
        self._updates: list[Update] = []  # those that took, in order
        self._one_at_a_time = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._accept, name="rtinfer-control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._one_at_a_time:
            for connection in self._members:
                with contextlib.suppress(OSError):
                    connection.close()
            self._members.clear()
        shutil.rmtree(self._folder, ignore_errors=True)

    @property
    def members(self) -> list[int]:
        """The pids of the workers taking updates now."""
        return sorted(self._members.values())

    @property
    def updates(self) -> list[Update]:
        """The updates that took, in order (what a joining worker applies)."""
        return list(self._updates)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection = self._listener.accept()
            except Exception as exc:  # a caller without the key, or the listener closed
                if self._closed.is_set():
                    return
                log.warning("refused a connection to the management hub: %s", exc)
                continue
            threading.Thread(
                target=self._serve, args=(connection,), name="rtinfer-control-call", daemon=True
            ).start()

    def _serve(self, connection: Connection) -> None:
        try:
            hello = _decode_hello(connection.recv_bytes())
            if hello.role == "member":
                self._join(connection, hello.pid)
                return  # the connection stays open, for the updates to come
            update = _decode_update(connection.recv_bytes())
            connection.send_bytes(_encode(self._fan_out(update, hello.pid)))
        except (EOFError, OSError, msgspec.DecodeError) as exc:
            log.warning("a management call broke off: %s", exc)
        connection.close()

    def _join(self, connection: Connection, pid: int) -> None:
        with self._one_at_a_time:
            connection.send_bytes(_encode(self._updates))
            if not connection.poll(APPLY_TIMEOUT_S):
                raise OSError(f"worker {pid} did not apply the earlier updates in time")
            for update, outcome in zip(
                self._updates, _decode_outcomes(connection.recv_bytes()), strict=True
            ):
                if outcome.status != 200:
                    log.warning(
                        "worker %d could not apply the earlier %s of model %r: %s",
                        pid, update.action, update.name, outcome.detail,
                    )  # fmt: skip
            self._members[connection] = pid
            connection.send_bytes(_encode(_Outcome(200)))  # counted: the next update is its

    def _fan_out(self, update: Update, asker: int) -> _Outcome:
        """Apply ``update`` in every worker; 200, or the first failure (and how many took)."""
        with self._one_at_a_time:
            members = list(self._members.items())
            outcomes: list[tuple[int, _Outcome]] = []
            message = _encode(update)
            for connection, _ in members:
                with contextlib.suppress(OSError):
                    connection.send_bytes(message)
            for connection, pid in members:
                try:
                    if not connection.poll(APPLY_TIMEOUT_S):
                        raise OSError(f"no answer within {APPLY_TIMEOUT_S:.0f} s")
                    outcomes.append((pid, _decode_outcome(connection.recv_bytes())))
                except (EOFError, OSError) as exc:  # gone: its replacement joins afresh
                    log.warning("worker %d left the management hub: %s", pid, exc)
                    del self._members[connection]
                    with contextlib.suppress(OSError):
                        connection.close()
            took = sum(1 for _, o in outcomes if o.status == 200)
            if took:
                self._updates.append(update)
        if not outcomes:
            return _Outcome(503, "no worker takes updates now; try again once they are ready")
        failed = [(pid, o) for pid, o in outcomes if o.status != 200]
        if not failed:
            return _Outcome(200)
        pid, first = next(((p, o) for p, o in failed if p == asker), failed[0])
        if took:  # the workers now differ: say so
            return _Outcome(
                first.status,
                f"{first.detail} (in worker {pid}; the update took in {took} of "
                f"{len(outcomes)} workers)",
            )
        return first


class ControlMember:
    """In a worker: applies every update the hub sends, and asks it to fan one out.

    :meth:`join` (on the worker's event loop, at start-up) applies the updates that took
    before, then keeps a connection on which a thread waits for the next ones; each is
    applied on the event loop through ``management`` (one at a time: the hub sends
    none before the last is answered). :meth:`ask` sends this worker's update to the hub.
    """

    def __init__(self, address: str, authkey: bytes, management: Management) -> None:
        self.address = address
        self._authkey = authkey
        self._management = management
        self._connection: Connection | None = None
        self._thread: threading.Thread | None = None

    async def join(self) -> None:
        loop = asyncio.get_running_loop()
        connection = await asyncio.to_thread(self._connect, "member")
        try:
            updates = _decode_updates(await asyncio.to_thread(connection.recv_bytes))
            outcomes = [await self._apply(update) for update in updates]
            connection.send_bytes(_encode(outcomes))
            await asyncio.to_thread(connection.recv_bytes)  # counted among the members
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        self._thread = threading.Thread(
            target=self._follow, args=(connection, loop), name="rtinfer-control", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop taking updates (at shutdown)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            # Shut down, not closed: the thread blocked reading it reads the end.
            with (
                contextlib.suppress(OSError),
                socket.socket(fileno=os.dup(connection.fileno())) as sock,
            ):
                sock.shutdown(socket.SHUT_RDWR)

    async def ask(self, update: Update) -> None:
        """Have every worker apply ``update``; :class:`HttpError` with the first failure."""
        outcome = await asyncio.to_thread(self._ask, update)
        if outcome.status != 200:
            raise HttpError(outcome.status, outcome.detail)

    def _ask(self, update: Update) -> _Outcome:
        connection = self._connect("ask")
        try:
            connection.send_bytes(_encode(update))
            return _decode_outcome(connection.recv_bytes())
        except (EOFError, OSError) as exc:
            return _Outcome(503, f"the management hub hung up ({exc}); try again")
        finally:
            connection.close()

    def _connect(self, role: str) -> Connection:
        try:
            connection = Client(self.address, family="AF_UNIX", authkey=self._authkey)
            connection.send_bytes(_encode(_Hello(role, os.getpid())))
        except (OSError, EOFError) as exc:
            raise HttpError(
                503, f"cannot reach the management hub at {self.address}: {exc}"
            ) from exc
        return connection

    def _follow(self, connection: Connection, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while True:
                update = _decode_update(connection.recv_bytes())
                outcome = asyncio.run_coroutine_threadsafe(self._apply(update), loop).result()
                connection.send_bytes(_encode(outcome))
        except (EOFError, OSError, RuntimeError):  # the hub or this worker is stopping
            pass
        finally:
            with contextlib.suppress(OSError):
                connection.close()

    async def _apply(self, update: Update) -> _Outcome:
        try:
            await self._management.apply(update.action, update.name, update.body)
        except HttpError as exc:
            return _Outcome(exc.status, exc.message)
        except Exception as exc:  # reported to the asker, not raised in the hub's thread
            log.exception("applying a management update failed")
            return _Outcome(500, f"{type(exc).__name__}: {exc}")
        return _Outcome(200)
