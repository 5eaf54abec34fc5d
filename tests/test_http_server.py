"""rtinfer's own HTTP/1.1 + WebSocket server (rtinfer.http.server), over real sockets.

Each server runs on its own event loop in a background thread (uvloop, as ``rtinfer
serve`` runs it; one test also on asyncio's loop). The clients are real: httpx, the
``websockets`` client, and raw sockets where the bytes on the wire are the point
(pipelining, chunked bodies, ``Expect: 100-continue``, malformed requests). No
timing is asserted: waits are bounded by ``SAFETY`` only as a net against hangs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvloop
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus

from conftest import SAFETY
from rtinfer.http import InferenceApp
from rtinfer.http.server import STEADY_S, HttpServer, LifespanFailed, Receive, Scope, Send
from rtinfer.models import load_model
from rtinfer.serving import ModelServer
from test_serve_drain import body as drain_body
from test_serve_drain import start_serve, wait_ready

LIMIT = 1024  # max_body_bytes of the protocol tests' server


@dataclass
class Probe:
    """A small ASGI app that answers what it saw, and records what happened to it."""

    events: list[str] = field(default_factory=list)
    calls: int = 0
    disconnects: int = 0
    gate: threading.Event = field(default_factory=threading.Event)
    held: int = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.events.append("startup")
                    await send({"type": "lifespan.startup.complete"})
                else:
                    self.events.append("shutdown")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert scope["type"] == "http"
        self.calls += 1
        message = await receive()
        assert message["type"] == "http.request"
        assert message["more_body"] is False  # the whole body, at once
        body: bytes = message["body"]
        path = scope["path"]
        if path.startswith("/delay/"):  # answers late: pipelined answers must stay in order
            await asyncio.sleep(int(path.rsplit("/", 1)[1]) / 1000)
        elif path == "/held":  # until the test opens the gate
            self.held += 1
            while not self.gate.is_set():  # noqa: ASYNC110  (a thread's event: polled)
                await asyncio.sleep(0.005)
        elif path == "/until-disconnect":
            self.held += 1
            if (await receive())["type"] == "http.disconnect":
                self.disconnects += 1
            return
        elif path == "/stream":  # chunked: three pieces
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for piece in (b"one,", b"two,", b"three"):
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        elif path.startswith("/big/"):  # a large body, many sends: flow control
            size = int(path.rsplit("/", 1)[1])
            piece = b"x" * (256 * 1024)
            headers = [(b"content-length", b"%d" % (size * len(piece)))]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            for i in range(size):
                more = i < size - 1
                await send({"type": "http.response.body", "body": piece, "more_body": more})
            return
        elif path == "/fail":
            raise RuntimeError("the app failed")
        answer = json.dumps(
            {
                "method": scope["method"],
                "path": path,
                "query": scope["query_string"].decode(),
                "body": body.decode("latin-1"),
                "client_port": scope["client"][1],
                "http_version": scope["http_version"],
                "startup_seen": "startup" in self.events,
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": answer})


@dataclass
class Running:
    port: int
    server: HttpServer
    loop: asyncio.AbstractEventLoop

    def call(self, coro: Any, timeout: float = SAFETY) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextmanager
def running(
    app: Any,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop,
    **kw: Any,
) -> Iterator[Running]:
    """``app`` served on a free port by an HttpServer on a loop in a thread; stopped after."""
    loop = loop_factory()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = HttpServer(app, sock=sock, **kw)
    run = Running(sock.getsockname()[1], server, loop)
    try:
        run.call(server.start())
        yield run
    finally:
        try:
            run.call(server.stop(SAFETY), SAFETY * 2)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(SAFETY)
            loop.close()
            sock.close()


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
def served(probe: Probe) -> Iterator[Running]:
    with running(probe, max_body_bytes=LIMIT) as run:
        yield run


# --------------------------------------------------------------------------- raw HTTP


def dial(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=SAFETY)


def read_response(stream: Any) -> tuple[int, dict[str, str], bytes]:
    """One response from a socket's file: status, headers (lower-case), body."""
    status_line = stream.readline()
    assert status_line, "the server closed the connection"
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = stream.read(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        parts = []
        while (size := int(stream.readline().strip(), 16)) > 0:
            parts.append(stream.read(size))
            stream.readline()
        stream.readline()
        body = b"".join(parts)
    else:
        body = stream.read()  # HTTP/1.0 without a length: until the close
    return status, headers, body


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed the connection (EOF or reset on the next read)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def post(path: str, body: bytes, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


# --------------------------------------------------------------------------- HTTP/1.1


async def test_keep_alive_serves_many_requests_on_one_connection(served: Running) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{served.port}") as client:
        answers = [(await client.post(f"/echo/{i}?q={i}", content=b"b%d" % i)) for i in range(5)]
    assert [a.status_code for a in answers] == [200] * 5
    seen = [a.json() for a in answers]
    assert [s["path"] for s in seen] == [f"/echo/{i}" for i in range(5)]
    assert [s["query"] for s in seen] == [f"q={i}" for i in range(5)]
    assert [s["body"] for s in seen] == [f"b{i}" for i in range(5)]
    assert len({s["client_port"] for s in seen}) == 1, "one connection, kept alive"
    assert all(a.headers["content-length"] == str(len(a.content)) for a in answers)
    assert "date" in answers[0].headers


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_pipelined_requests_are_answered_in_order(probe: Probe, loop: str) -> None:
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with running(probe, loop_factory=factory, max_body_bytes=LIMIT) as run, dial(run.port) as s:
        # The first answers last if run concurrently: the order must hold anyway.
        paths = ["/delay/30", "/delay/0", "/a", "/delay/10", "/b", *[f"/n{i}" for i in range(12)]]
        s.sendall(b"".join(post(p, p.encode()) for p in paths))
        stream = s.makefile("rb")
        answers = [read_response(stream) for _ in paths]
    assert [a[0] for a in answers] == [200] * len(paths)
    assert [json.loads(a[2])["path"] for a in answers] == paths


def test_http_1_0_closes_unless_kept_alive(served: Running) -> None:
    with dial(served.port) as s:
        s.sendall(b"GET /old HTTP/1.0\r\n\r\n")
        status, headers, body = read_response(s.makefile("rb"))
        assert (status, json.loads(body)["http_version"]) == (200, "1.0")
        assert headers["connection"] == "close"
        assert closed_by_server(s)
    with dial(served.port) as s:
        stream = s.makefile("rb")
        for _ in range(2):
            s.sendall(b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            status, headers, _ = read_response(stream)
            assert (status, headers["connection"]) == (200, "keep-alive")


def test_connection_close_is_honoured(served: Running) -> None:
    with dial(served.port) as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        status, headers, _ = read_response(s.makefile("rb"))
        assert (status, headers["connection"]) == (200, "close")
        assert closed_by_server(s)


def test_chunked_request_body_reaches_the_app_whole(served: Running) -> None:
    with dial(served.port) as s:
        s.sendall(
            b"POST /chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n1\r\n,\r\n6\r\n world\r\n0\r\n\r\n"
        )
        status, _, body = read_response(s.makefile("rb"))
    assert (status, json.loads(body)["body"]) == (200, "hello, world")


def test_chunked_response_when_the_app_streams(served: Running) -> None:
    with dial(served.port) as s:
        s.sendall(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, body = read_response(s.makefile("rb"))
    assert (status, headers["transfer-encoding"], body) == (200, "chunked", b"one,two,three")


def test_expect_100_continue(served: Running) -> None:
    with dial(served.port) as s:
        stream = s.makefile("rb")
        s.sendall(
            b"POST /cont HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        assert stream.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert stream.readline() == b"\r\n"
        s.sendall(b"data")
        status, _, body = read_response(stream)
    assert (status, json.loads(body)["body"]) == (200, "data")


def test_expect_100_continue_over_the_limit_gets_413_without_continue(
    served: Running, probe: Probe
) -> None:
    with dial(served.port) as s:
        s.sendall(
            f"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: {LIMIT + 1}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        status, headers, _ = read_response(s.makefile("rb"))
        assert (status, headers["connection"]) == (413, "close")
        assert closed_by_server(s)
    assert probe.calls == 0


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_bodies_over_the_limit_get_413_and_a_close(
    served: Running, probe: Probe, framing: str
) -> None:
    with dial(served.port) as s:
        if framing == "content-length":  # refused from the header, before any body
            s.sendall(
                f"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: {LIMIT + 1}\r\n\r\n".encode()
            )
        else:  # refused once the chunks pass the limit
            chunk = b"%x\r\n%s\r\n" % (400, b"y" * 400)
            s.sendall(
                b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 3
            )
        status, headers, body = read_response(s.makefile("rb"))
        assert (status, headers["connection"]) == (413, "close")
        assert str(LIMIT) in body.decode()
        assert closed_by_server(s)
    assert probe.calls == 0
    # Just at the limit is fine.
    with dial(served.port) as s:
        s.sendall(post("/ok", b"z" * LIMIT))
        assert read_response(s.makefile("rb"))[0] == 200


def test_a_413_waits_for_the_pipelined_answers_before_it(served: Running) -> None:
    with dial(served.port) as s:
        s.sendall(post("/delay/20", b"first") + post("/x", b"w" * (LIMIT + 1)))
        stream = s.makefile("rb")
        first = read_response(stream)
        second = read_response(stream)
        assert (first[0], json.loads(first[2])["body"]) == (200, "first")
        assert second[0] == 413
        assert closed_by_server(s)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
    ],
)
def test_malformed_requests_get_400_and_a_close(
    served: Running, probe: Probe, request_bytes: bytes
) -> None:
    with dial(served.port) as s:
        s.sendall(request_bytes)
        status, headers, _ = read_response(s.makefile("rb"))
        assert (status, headers["connection"]) == (400, "close")
        assert closed_by_server(s)
    assert probe.calls == 0


def test_an_oversized_head_gets_431(served: Running) -> None:
    with dial(served.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")
        try:
            for i in range(2000):
                s.sendall(b"X-Filler-%d: %s\r\n" % (i, b"v" * 60))
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused while still sending
        status, _, _ = read_response(s.makefile("rb"))
    assert status == 431


def test_app_failure_is_a_500_and_the_server_goes_on(served: Running) -> None:
    with dial(served.port) as s:
        s.sendall(b"GET /fail HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, _ = read_response(s.makefile("rb"))
        assert (status, headers["connection"]) == (500, "close")
    with httpx.Client(base_url=f"http://127.0.0.1:{served.port}") as client:
        assert client.get("/after").status_code == 200


def test_a_client_leaving_mid_request_leaves_the_server_healthy(
    served: Running, probe: Probe
) -> None:
    # Half a body, then gone.
    with dial(served.port) as s:
        s.sendall(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nonly-part")
    # Gone while the app works: its receive() says so, its answer is dropped.
    with dial(served.port) as s:
        s.sendall(b"GET /until-disconnect HTTP/1.1\r\nHost: t\r\n\r\n")
        deadline = time.monotonic() + SAFETY
        while probe.held == 0:
            assert time.monotonic() < deadline, "the request never reached the app"
            time.sleep(0.005)
    deadline = time.monotonic() + SAFETY
    while probe.disconnects == 0:
        assert time.monotonic() < deadline, "the app never heard of the disconnect"
        time.sleep(0.005)
    # Gone while the app is held: the answer is written to no one.
    with dial(served.port) as s:
        s.sendall(b"GET /held HTTP/1.1\r\nHost: t\r\n\r\n")
        while probe.held < 2:
            time.sleep(0.005)
    probe.gate.set()
    with httpx.Client(base_url=f"http://127.0.0.1:{served.port}") as client:
        assert [client.get(f"/after/{i}").status_code for i in range(3)] == [200] * 3
    deadline = time.monotonic() + SAFETY
    while served.server.connections:
        assert time.monotonic() < deadline, "connections left behind"
        time.sleep(0.005)


def test_large_responses_flow_through_a_slow_reader(served: Running) -> None:
    with dial(served.port) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        s.sendall(b"GET /big/32 HTTP/1.1\r\nHost: t\r\n\r\n")  # 8 MiB in 32 sends
        stream = s.makefile("rb")
        time.sleep(0.05)  # let the server's buffer fill up: its sends must wait, not pile up
        status, _, body = read_response(stream)
    assert (status, len(body)) == (200, 32 * 256 * 1024)


def test_head_answers_carry_no_body(served: Running) -> None:
    with dial(served.port) as s:
        s.sendall(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\nGET /g HTTP/1.1\r\nHost: t\r\n\r\n")
        stream = s.makefile("rb")
        assert stream.readline().startswith(b"HTTP/1.1 200")
        head = []
        while (line := stream.readline()) != b"\r\n":
            head.append(line)
        assert any(line.lower().startswith(b"content-length: ") for line in head)
        # The next bytes are the second answer, not a body.
        status, _, body = read_response(stream)
    assert (status, json.loads(body)["method"]) == (200, "GET")


# --------------------------------------------------------------------------- lifespan, stop


def test_lifespan_runs_before_accepting_and_after_the_last_connection(probe: Probe) -> None:
    with running(probe) as run:
        with httpx.Client(base_url=f"http://127.0.0.1:{run.port}") as client:
            assert client.get("/").json()["startup_seen"] is True
        assert probe.events == ["startup"]
    assert probe.events == ["startup", "shutdown"]


def test_a_failed_startup_is_raised_and_nothing_listens() -> None:
    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no model"})

    loop = uvloop.new_event_loop()
    try:
        server = HttpServer(failing, port=0)
        with pytest.raises(LifespanFailed, match="no model"):
            loop.run_until_complete(server.start())
    finally:
        loop.close()


def test_an_app_without_lifespan_is_served() -> None:
    async def plain(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise ValueError("only http")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    with running(plain) as run, httpx.Client(base_url=f"http://127.0.0.1:{run.port}") as client:
        answer = client.get("/")
        assert (answer.status_code, answer.content) == (204, b"")


def test_stop_lets_the_request_in_flight_finish_and_closes_idle_connections(
    probe: Probe,
) -> None:
    with running(probe, max_body_bytes=LIMIT) as run, ExitStack() as closing:
        idle, busy = dial(run.port), dial(run.port)
        closing.enter_context(idle)
        closing.enter_context(busy)
        idle.sendall(b"GET /idle HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(idle.makefile("rb"))[0] == 200
        busy.sendall(b"GET /held HTTP/1.1\r\nHost: t\r\n\r\n")
        deadline = time.monotonic() + SAFETY
        while probe.held == 0:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        stopping = asyncio.run_coroutine_threadsafe(run.server.stop(SAFETY), run.loop)
        assert closed_by_server(idle), "the idle keep-alive connection is closed at once"
        with pytest.raises(ConnectionRefusedError):  # no longer accepting
            dial(run.port).close()
        assert not stopping.done()
        assert probe.events == ["startup"], "no shutdown while a request runs"
        probe.gate.set()
        status, headers, _ = read_response(busy.makefile("rb"))
        assert (status, headers["connection"]) == (200, "close")
        stopping.result(SAFETY)
        assert probe.events == ["startup", "shutdown"]


def test_hurry_cancels_what_still_runs_then_shuts_down(probe: Probe) -> None:
    with running(probe) as run, dial(run.port) as busy:
        busy.sendall(b"GET /held HTTP/1.1\r\nHost: t\r\n\r\n")
        deadline = time.monotonic() + SAFETY
        while probe.held == 0:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        stopping = asyncio.run_coroutine_threadsafe(run.server.stop(SAFETY * 10), run.loop)
        run.loop.call_soon_threadsafe(run.server.hurry)
        stopping.result(SAFETY)
        assert probe.events == ["startup", "shutdown"]
        # The held request was cancelled, and answered so before its connection closed.
        answer = busy.makefile("rb").read()
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert answer.endswith(
            b'{"error": "the server stopped before answering this request; retry"}'
        )
    probe.gate.set()


# --------------------------------------------------------------------------- early answers


@dataclass
class EarlyProbe(Probe):
    """The probe, answering ``/early`` from the head (``early_answer``): 503, its own body."""

    asked: list[str] = field(default_factory=list)

    def early_answer(self, scope: Scope) -> tuple[int, bytes] | None:
        self.asked.append(scope["path"])
        if scope["path"] != "/early":
            return None
        body = b'{"error": "early"}'
        return 503, b"content-length: %d\r\nretry-after: 1\r\n\r\n%b" % (len(body), body)


def test_an_early_answer_leaves_from_the_head_and_the_connection_goes_on() -> None:
    probe = EarlyProbe()
    with running(probe, max_body_bytes=LIMIT) as run, dial(run.port) as sock:
        stream = sock.makefile("rb")
        # Its body is read past, not kept: the request after it on the connection is whole.
        sock.sendall(post("/early", b"x" * 500) + post("/echo", b"ok"))
        status, headers, body = read_response(stream)
        assert (status, headers["retry-after"], body) == (503, "1", b'{"error": "early"}')
        assert "date" in headers
        status, _, body = read_response(stream)
        assert status == 200
        assert json.loads(body)["body"] == "ok"
        assert probe.calls == 1  # the app never saw /early
        assert probe.asked == ["/early", "/echo"]


def test_no_early_answer_behind_a_queued_request_or_before_100_continue() -> None:
    probe = EarlyProbe()
    with running(probe, max_body_bytes=LIMIT) as run, dial(run.port) as sock:
        stream = sock.makefile("rb")
        # Pipelined behind a slow request, /early is the app's: answers keep their order.
        sock.sendall(post("/delay/50", b"a") + post("/early", b"b"))
        answers = [read_response(stream) for _ in range(2)]
        assert [a[0] for a in answers] == [200, 200]
        assert [json.loads(a[2])["path"] for a in answers] == ["/delay/50", "/early"]
        assert probe.asked == ["/delay/50"]
    # A client waiting for 100-continue is answered by the app as usual.
    with running(probe, max_body_bytes=LIMIT) as run, dial(run.port) as sock:
        stream = sock.makefile("rb")
        head = (
            b"POST /early HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n"
        )
        sock.sendall(head)
        assert stream.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert stream.readline() == b"\r\n"
        sock.sendall(b"ok")
        status, _, body = read_response(stream)
        assert (status, json.loads(body)["body"]) == (200, "ok")
        assert probe.asked == ["/delay/50"]


# --------------------------------------------------------------------------- InferenceApp


@pytest.fixture
def inference(model_file: Path) -> Iterator[Running]:
    server = ModelServer()
    server.add(load_model(model_file, name="linear"))
    with running(InferenceApp(server, max_body_bytes=64 * 1024), max_body_bytes=64 * 1024) as run:
        yield run


def oip(request_id: str, x: float) -> dict[str, Any]:
    tensor = {"name": "features", "shape": [1, 2], "datatype": "FP32", "data": [x, 0]}
    return {"id": request_id, "inputs": [tensor]}


async def test_inference_app_over_http(inference: Running) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{inference.port}") as client:
        assert (await client.get("/v2/health/ready")).json() == {"ready": True}
        answers = await asyncio.gather(
            *(client.post("/v2/models/linear/infer", json=oip(f"r{i}", i / 10)) for i in range(8))
        )
        assert [a.status_code for a in answers] == [200] * 8
        data = [a.json()["outputs"][0]["data"] for a in answers]
        assert data == [pytest.approx([1 - i / 10, i / 10]) for i in range(8)]
        missing = await client.get("/v2/models/nope")
        assert missing.status_code == 404
        assert "unknown model" in missing.json()["error"]


def counted_app(model_file: Path) -> tuple[ModelServer, InferenceApp, list[str]]:
    """A linear model served at most 4 calls at once, and the paths its app was called for."""
    server = ModelServer(max_concurrency=4)
    server.add(load_model(model_file, name="linear"))
    app = InferenceApp(server, max_body_bytes=64 * 1024)
    called: list[str] = []
    dispatch = app._http

    async def counted(scope: Scope, receive: Receive, send: Send) -> None:
        called.append(scope["path"])
        await dispatch(scope, receive, send)

    app._http = counted  # type: ignore[method-assign]
    return server, app, called


def test_inference_app_refuses_a_full_model_from_the_head(model_file: Path) -> None:
    server, app, called = counted_app(model_file)
    body = json.dumps(oip("r1", 0.5)).encode()
    infer = post("/v2/models/linear/infer", body, "Content-Type: application/json\r\n")
    with running(app, max_body_bytes=64 * 1024) as run, dial(run.port) as sock:
        stream = sock.makefile("rb")
        limiter = server.get("linear").limiter
        assert limiter is not None

        async def fill() -> list[Any]:
            return [limiter.try_acquire() for _ in range(limiter.limit)]

        permits = run.call(fill())
        sock.sendall(infer)
        status, headers, answer = read_response(stream)
        assert (status, headers["retry-after"]) == (503, "1")
        assert json.loads(answer)["error"] == (
            "model 'linear' is at its concurrency limit; critical call shed, retry after 1 s"
        )
        assert called == []  # refused from the head: the app was not called
        # What the head does not settle is the app's: a bad X-Priority is a 400.
        sock.sendall(post("/v2/models/linear/infer", body, "X-Priority: urgent\r\n"))
        assert read_response(stream)[0] == 400
        assert called == ["/v2/models/linear/infer"]

        async def free() -> None:
            for permit in permits:
                permit.release()

        run.call(free())
        sock.sendall(infer)  # the same connection, kept alive
        status, _, answer = read_response(stream)
        assert status == 200
        assert json.loads(answer)["outputs"][0]["data"] == pytest.approx([0.5, 0.5])
    registry = server.metrics.registry
    assert (
        registry.get_sample_value(
            "rtinfer_limiter_rejected_total",
            {"limiter": "linear", "priority": "critical", "reason": "limit"},
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "rtinfer_http_requests_total", {"route": "/v2/models/{name}/infer", "status": "503"}
        )
        == 1
    )


async def test_early_answers_keep_only_the_paths_of_models_served(model_file: Path) -> None:
    server = ModelServer(max_concurrency=4)
    server.add(load_model(model_file, name="linear"))
    app = InferenceApp(server)
    await server.start()
    try:
        limiter = server.get("linear").limiter
        assert limiter is not None
        permits = [limiter.try_acquire() for _ in range(limiter.limit)]

        def scope(path: str) -> Scope:
            return {"type": "http", "method": "POST", "path": path, "headers": []}

        for i in range(50):  # made-up models: the usual way (404), and nothing kept
            assert app.early_answer(scope(f"/v2/models/nope{i}/infer")) is None
        for _ in range(3):
            answer = app.early_answer(scope("/v2/models/linear/infer"))
            assert answer is not None
            assert answer[0] == 503
        version = server.get("linear").version
        assert app.early_answer(scope(f"/v2/models/linear/versions/{version}/infer")) is not None
        assert list(app._infer_paths) == [
            "/v2/models/linear/infer",
            f"/v2/models/linear/versions/{version}/infer",
        ]
        for permit in permits:
            permit.release()
    finally:
        await server.aclose()


def test_heads_read_in_one_turn_get_through_only_as_far_as_the_room(model_file: Path) -> None:
    # Ten requests wait while the loop is held, so one turn reads all ten heads; two
    # places are free. Two reach the app and are answered; eight are refused from the
    # head, not let through to be refused later, each on a task of its own.
    server, app, called = counted_app(model_file)
    infer = post("/v2/models/linear/infer", json.dumps(oip("r", 0.5)).encode())
    with running(app, max_body_bytes=64 * 1024) as run:
        socks = [dial(run.port) for _ in range(10)]
        try:
            for sock in socks:  # connected and idle before the loop is held
                sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
                assert read_response(sock.makefile("rb"))[0] == 200
            called.clear()
            limiter = server.get("linear").limiter
            assert limiter is not None

            async def fill() -> list[Any]:
                return [limiter.try_acquire() for _ in range(limiter.limit - 2)]

            permits = run.call(fill())
            held, released = threading.Event(), threading.Event()

            def hold() -> None:  # a callback on the loop: it reads nothing meanwhile
                held.set()
                time.sleep(0.3)
                released.set()

            run.loop.call_soon_threadsafe(hold)
            assert held.wait(SAFETY)
            for sock in socks:
                sock.sendall(infer)
            assert released.wait(SAFETY)
            statuses = sorted(read_response(sock.makefile("rb"))[0] for sock in socks)
            assert statuses == [200, 200] + [503] * 8
            assert called == ["/v2/models/linear/infer"] * 2

            async def free() -> None:
                for permit in permits:
                    permit.release()

            run.call(free())
        finally:
            for sock in socks:
                sock.close()


async def test_websocket_round_trip_through_inference_app(inference: Running) -> None:
    base = f"ws://127.0.0.1:{inference.port}"
    async with connect(f"{base}/v2/models/linear/infer/stream") as ws:
        for i in range(20):
            await ws.send(json.dumps(oip(f"w{i}", i / 20)))
        answers = {}
        for _ in range(20):
            answer = json.loads(await asyncio.wait_for(ws.recv(), SAFETY))
            answers[answer["id"]] = answer
        assert set(answers) == {f"w{i}" for i in range(20)}
        assert answers["w5"]["outputs"][0]["data"] == pytest.approx([0.75, 0.25])
        await ws.send("{not json")
        assert "not valid JSON" in json.loads(await asyncio.wait_for(ws.recv(), SAFETY))["error"]
    # An unknown path is refused at the handshake; an unknown model closes with 4404.
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{base}/v2/models/linear/infer"):
            pass
    assert refused.value.response.status_code == 403
    async with connect(f"{base}/v2/models/nope/infer/stream") as ws:
        assert "unknown model" in json.loads(await asyncio.wait_for(ws.recv(), SAFETY))["error"]
        with pytest.raises(ConnectionClosedError) as closed:
            await asyncio.wait_for(ws.recv(), SAFETY)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4404


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """One unmasked (server) WebSocket frame: its opcode and payload."""
    head = read_exactly(sock, 2)
    size = head[1] & 0x7F
    if size == 126:
        size = int.from_bytes(read_exactly(sock, 2), "big")
    elif size == 127:
        size = int.from_bytes(read_exactly(sock, 8), "big")
    return head[0] & 0x0F, read_exactly(sock, size)


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def test_a_silent_websocket_client_is_pinged_then_closed_with_1011(model_file: Path) -> None:
    server = ModelServer()
    server.add(load_model(model_file, name="linear"))
    with running(InferenceApp(server), ping_s=1.0) as run:
        sock = dial(run.port)
        sock.sendall(
            b"GET /v2/models/linear/infer/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += read_exactly(sock, 1)
        assert head.startswith(b"HTTP/1.1 101")
        # The client never answers: a ping comes, then the close, then the end.
        assert read_frame(sock) == (0x9, b"rtinfer")
        opcode, payload = read_frame(sock)
        assert opcode == 0x8
        assert int.from_bytes(payload[:2], "big") == 1011
        assert sock.recv(1) == b""
        sock.close()
        assert closed_eventually(run)


def closed_eventually(run: Running) -> bool:
    for _ in range(int(SAFETY / 0.05)):
        if run.server.connections == 0:
            return True
        time.sleep(0.05)
    return False


async def test_a_websocket_client_answering_pings_stays_connected(model_file: Path) -> None:
    server = ModelServer()
    server.add(load_model(model_file, name="linear"))
    with running(InferenceApp(server), ping_s=1.0) as run:
        # The client pings only every 20 s: the server's pings and its pongs keep it open.
        async with connect(f"ws://127.0.0.1:{run.port}/v2/models/linear/infer/stream") as ws:
            await asyncio.sleep(3.5)  # past the server's ping and its wait for an answer
            await ws.send(json.dumps(oip("late", 0.25)))
            answer = json.loads(await asyncio.wait_for(ws.recv(), SAFETY))
            assert answer["id"] == "late"


async def test_websocket_messages_over_the_limit_close_with_1009(model_file: Path) -> None:
    server = ModelServer()
    server.add(load_model(model_file, name="linear"))
    app = InferenceApp(server, max_body_bytes=4096)
    with running(app, max_body_bytes=4096) as run:
        url = f"ws://127.0.0.1:{run.port}/v2/models/linear/infer/stream"
        async with connect(url, max_size=None) as ws:
            await ws.send(json.dumps(oip("small", 0.5)))
            assert json.loads(await asyncio.wait_for(ws.recv(), SAFETY))["id"] == "small"
            await ws.send("x" * 5000)
            with pytest.raises(ConnectionClosedError) as closed:
                await asyncio.wait_for(ws.recv(), SAFETY)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009


async def test_stop_closes_websockets_with_1001(inference: Running) -> None:
    url = f"ws://127.0.0.1:{inference.port}/v2/models/linear/infer/stream"
    async with connect(url) as ws:
        await ws.send(json.dumps(oip("a", 0.5)))
        await asyncio.wait_for(ws.recv(), SAFETY)
        stopping = asyncio.run_coroutine_threadsafe(inference.server.stop(SAFETY), inference.loop)
        with pytest.raises(ConnectionClosed) as gone:
            await asyncio.wait_for(ws.recv(), SAFETY)
        await asyncio.wrap_future(stopping)
    assert gone.value.rcvd is not None
    assert gone.value.rcvd.code == 1001


# --------------------------------------------------------------------------- rtinfer serve


def worker_pids(parent: int) -> set[int]:
    """The worker processes of ``parent`` (children started by multiprocessing's spawn)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == parent and b"spawn_main" in command:
            found.add(int(entry.name))
    return found


async def answer_four(c: httpx.AsyncClient) -> None:
    answers = [await c.post("/v2/models/gated/infer", json=drain_body(0.5)) for _ in range(4)]
    assert [a.status_code for a in answers] == [200] * 4


@pytest.mark.timeout(120)
async def test_rtinfer_serve_workers_share_the_port_and_one_that_dies_is_replaced(
    tmp_path: Path,
) -> None:
    (tmp_path / "gate").touch()  # nothing held
    process, port, log = await start_serve(tmp_path, "--workers", "2", http_server="rtinfer")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=SAFETY) as c:
            await wait_ready(c, process, log)
            await answer_four(c)
            workers = worker_pids(process.pid)
            assert len(workers) == 2, workers
            await asyncio.sleep(STEADY_S)  # past start-up: a death now is an accident
            victim = min(workers)
            os.kill(victim, signal.SIGKILL)
            for _ in range(int(SAFETY * 6 / 0.05)):
                now = worker_pids(process.pid)
                if len(now) == 2 and victim not in now:
                    break
                assert process.returncode is None, log.read_text()
                await asyncio.sleep(0.05)
            else:
                pytest.fail(f"no worker replaced {victim}: {log.read_text()}")
            await wait_ready(c, process, log)
            await answer_four(c)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), SAFETY * 3) == 0, log.read_text()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert "starting another in its place" in log.read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["workers"] == 2
    assert summary["requests"] >= 5  # the survivors' answers and readiness checks
