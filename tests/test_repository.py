"""Model updates while serving: load, warm up, promote and unload under load, with no failed
request; the management routes and their key; ``rtinfer models``; ``rtinfer serve --watch``.

Real servers (uvicorn in a thread, or ``rtinfer serve`` in a subprocess) and real clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from conftest import SAFETY, wait_until
from rtinfer.cli import main as cli
from rtinfer.http import InferenceApp
from rtinfer.models import PythonModel, tensor
from rtinfer.repository import ModelManager, ModelRepository
from rtinfer.serve import build_server
from rtinfer.serving import ModelServer
from rtinfer.types import Arrays
from test_http import free_port, infer_body, serving

MKEY = "manage-me"
APIKEY = "infer-me"
MANAGE = {"Authorization": f"Bearer {MKEY}"}


def write_model(path: Path, scale: float) -> Path:
    """An ONNX model: ``probabilities = [1 - scale * x, scale * x]`` for ``features = [x, y]``."""
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.array([[-scale, scale], [0, 0]], np.float32), "W")
    bias = numpy_helper.from_array(np.array([1, 0], np.float32), "B")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "W"], ["XW"]),
            helper.make_node("Add", ["XW", "B"], ["probabilities"]),
        ],
        "linear",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])],
        initializer=[weights, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.onnx").write_bytes(model.SerializeToString())
    return path


#: What each version answers for x = 0.25: version "N" scales x by N.
def expected(version: str, x: float = 0.25) -> list[float]:
    return [1 - int(version) * x, int(version) * x]


def make_repo(root: Path, *versions: str, config: str = "max_batch_size: 8\n") -> Path:
    for version in versions:
        write_model(root / "linear" / version, float(version))
    (root / "linear" / "config.yaml").write_text(config)
    return root


def add_version(repo: Path, version: str) -> None:
    """Write a version the way to deploy one: under a hidden name, then rename."""
    hidden = write_model(repo / "linear" / f".tmp-{version}", float(version))
    hidden.rename(repo / "linear" / version)


class Load:
    """Clients sending requests one after another until stopped; every answer recorded."""

    def __init__(self, client: httpx.AsyncClient, clients: int = 4) -> None:
        self.client = client
        self.answers: list[list[tuple[int, str, list[float]]]] = [[] for _ in range(clients)]
        self.failures: list[Any] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._run(i)) for i in range(clients)]

    async def _run(self, i: int) -> None:
        while not self._stop.is_set():
            try:
                r = await self.client.post("/v2/models/linear/infer", json=infer_body([[0.25, 0]]))
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))
                continue
            if r.status_code != 200:
                self.failures.append((r.status_code, r.text))
                continue
            body = r.json()
            self.answers[i].append(
                (r.status_code, body["model_version"], body["outputs"][0]["data"])
            )

    def count(self, version: str | None = None) -> int:
        return sum(1 for a in self.answers for _, v, _ in a if version is None or v == version)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def check(self, first: str, then: str) -> None:
        """No failure; each client saw ``first``, then ``then``, never back; right answers."""
        assert self.failures == []
        for answers in self.answers:
            versions = [v for _, v, _ in answers]
            assert set(versions) <= {first, then}
            switched = versions.index(then) if then in versions else len(versions)
            assert versions[switched:] == [then] * (len(versions) - switched), "went back"
            for _, version, data in answers:
                np.testing.assert_allclose(data, expected(version), rtol=1e-6)
        assert self.count(first) > 0
        assert self.count(then) > 0


@contextlib.asynccontextmanager
async def managed(repo: Path, *, watch_s: float | None = None, api_key: str | None = None) -> Any:
    server = build_server(repo)
    manager = ModelManager(server, ModelRepository(repo), retire_grace_s=0.05, watch_s=watch_s)
    app = InferenceApp(server, manager=manager, management_key=MKEY, api_key=api_key)
    with serving(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=SAFETY) as client:
            yield server, manager, client


# -- reload under load ----------------------------------------------------------------


async def test_load_and_promote_under_load_through_the_management_routes(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", "1")
    async with managed(repo) as (server, _, client):
        old = server.get("linear")
        load = Load(client)
        await wait_until(lambda: load.count("1") >= 20, "requests on version 1")
        add_version(repo, "2")
        r = await client.post(
            "/v2/repository/models/linear/load", json={"version": "2"}, headers=MANAGE
        )
        assert r.status_code == 200, r.text
        states = {e["version"]: (e["state"], e["default"]) for e in r.json()["versions"]}
        assert states == {"1": ("READY", True), "2": ("READY", False)}
        new = server.get("linear", "2")
        assert new.batcher.ready  # loaded and warmed up before anything reaches it
        before = load.count()
        await wait_until(lambda: load.count() >= before + 20, "requests after the load")
        assert load.count("2") == 0  # loaded, not promoted: requests naming none stay on 1
        r = await client.post(
            "/v2/repository/models/linear/promote", json={"version": "2"}, headers=MANAGE
        )
        assert r.status_code == 200, r.text
        await wait_until(lambda: min(len(a) for a in load.answers) > 0, "every client answered")
        await wait_until(lambda: load.count("2") >= 40, "requests on version 2")
        await wait_until(lambda: not old.batcher.ready, "the old version closed")
        after_close = load.count()
        await wait_until(lambda: load.count() >= after_close + 20, "requests after the close")
        await load.stop()
        load.check("1", "2")
        assert (await client.get("/v2/models/linear/versions/1")).status_code == 404
        assert [s.version for s in server.all()] == ["2"]
        index = (await client.post("/v2/repository/index", headers=MANAGE)).json()
        assert [(e["version"], e["state"], e["default"]) for e in index] == [
            ("1", "UNAVAILABLE", False),  # on disk, not loaded
            ("2", "READY", True),
        ]


async def test_watch_loads_and_promotes_a_new_folder_under_load(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", "1")
    async with managed(repo, watch_s=0.05) as (server, _, client):
        old = server.get("linear")
        load = Load(client)
        await wait_until(lambda: load.count("1") >= 20, "requests on version 1")
        add_version(repo, "2")
        await wait_until(lambda: load.count("2") >= 40, "the watch promoting version 2")
        await wait_until(lambda: not old.batcher.ready, "the old version closed")
        await load.stop()
        load.check("1", "2")
        for _ in range(5):
            await asyncio.sleep(0.05)  # several rounds: version 1, promoted over, stays out
        assert [s.version for s in server.all()] == ["2"]
        # A version whose folder is removed is unloaded; never a model's last one.
        add_version(repo, "3")
        await wait_until(lambda: server.get("linear").version == "3", "version 3 promoted")
        r = await client.post(
            "/v2/repository/models/linear/load", json={"version": "2"}, headers=MANAGE
        )
        assert r.status_code == 200, r.text
        two = server.get("linear", "2")
        shutil.rmtree(repo / "linear" / "2")
        await wait_until(lambda: not two.batcher.ready, "the watch unloading version 2")
        shutil.rmtree(repo / "linear" / "3")
        shutil.rmtree(repo / "linear" / "1", ignore_errors=True)
        for _ in range(5):
            await asyncio.sleep(0.05)  # several rounds of the watch: 3 is the last, it stays
        r = await client.post("/v2/models/linear/infer", json=infer_body([[0.25, 0]]))
        assert (r.status_code, r.json()["model_version"]) == (200, "3")


async def test_auto_promote_false_only_loads(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", "1", config="auto_promote: false\n")
    async with managed(repo, watch_s=0.05) as (server, _, _):
        add_version(repo, "2")
        await wait_until(lambda: len(server.all()) == 2, "version 2 loaded")
        assert server.get("linear").version == "1"
        assert server.get("linear", "2").batcher.ready


async def test_a_broken_version_is_not_served_and_not_retried(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", "1")
    async with managed(repo, watch_s=0.05) as (server, manager, client):
        (repo / "linear" / "2").mkdir()
        (repo / "linear" / "2" / "model.onnx").write_bytes(b"not a model")

        async def failed() -> bool:
            index = await manager.index()
            return any(e["version"] == "2" and "failed" in e["reason"] for e in index)

        for _ in range(int(SAFETY / 0.05)):
            if await failed():
                break
            await asyncio.sleep(0.05)
        assert await failed()
        assert [s.version for s in server.all()] == ["1"]
        assert server.ready
        r = await client.post(
            "/v2/repository/models/linear/load", json={"version": "2"}, headers=MANAGE
        )
        assert r.status_code == 422
        assert "could not be loaded" in r.json()["error"]


async def test_a_new_version_is_warmed_up_before_its_first_request() -> None:
    calls: list[int] = []

    def predict(inputs: Arrays) -> Arrays:
        calls.append(len(inputs["features"]))
        x = inputs["features"][:, :1]
        return {"probabilities": np.concatenate([1 - x, x], axis=1)}

    def model(version: str) -> PythonModel:
        return PythonModel(
            predict,
            inputs=[tensor("features", "float32", [None, 2])],
            outputs=[tensor("probabilities", "float32", [None, 2])],
            name="linear",
            version=version,
        )

    server = ModelServer(batching={"max_batch_size": 8})
    server.add(model("1"))
    await server.start()
    try:
        calls.clear()
        served = await server.install(model("2"))
        warmed = list(calls)
        assert sorted(set(warmed)) == [1, 2, 4, 8]  # every batch size in use
        assert server.get("linear").version == "1"  # not the default until promoted
        rows = {"features": np.array([[0.25, 0.0]], np.float32)}
        answer = await server.infer("linear", rows, version="2")
        assert answer.served is served
        assert calls[len(warmed) :] == [1]
        previous = server.promote("linear", "2")
        assert previous.version == "1"
        assert (await server.infer("linear", rows)).served is served
        with pytest.raises(ValueError, match="already serves version '2'"):
            await server.install(model("2"))
    finally:
        await server.aclose()


async def test_unload_refuses_the_default_unless_forced(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", "1", "2")
    async with managed(repo) as (server, _, client):
        r = await client.post(
            "/v2/repository/models/linear/unload", json={"version": "2"}, headers=MANAGE
        )
        assert r.status_code == 409
        assert "default" in r.json()["error"]
        r = await client.post(
            "/v2/repository/models/linear/unload", json={"version": "1"}, headers=MANAGE
        )
        assert r.status_code == 200, r.text
        assert [e["version"] for e in r.json()["versions"] if e["state"] == "READY"] == ["2"]
        r = await client.post(
            "/v2/repository/models/linear/promote", json={"version": "1"}, headers=MANAGE
        )
        assert r.status_code == 409  # on disk, not loaded
        assert "load it first" in r.json()["error"]
        two = server.get("linear")
        r = await client.post(
            "/v2/repository/models/linear/load", json={"promote": True}, headers=MANAGE
        )
        assert r.status_code == 200  # the highest on disk is 2, already served: nothing to do
        assert server.get("linear") is two
        load = Load(client, clients=2)
        await wait_until(lambda: load.count() >= 10)
        r = await client.post(
            "/v2/repository/models/linear/load", json={"version": "1"}, headers=MANAGE
        )
        assert r.status_code == 200
        r = await client.post(
            "/v2/repository/models/linear/promote",
            json={"version": "1", "keep_previous": True},
            headers=MANAGE,
        )
        assert r.status_code == 200
        await wait_until(lambda: load.count("1") >= 10)
        r = await client.post(
            "/v2/repository/models/linear/unload",
            json={"version": "1", "force": True},
            headers=MANAGE,
        )
        assert r.status_code == 200, r.text
        assert server.get("linear").version == "2"
        await wait_until(lambda: load.count("2") >= 10)
        await load.stop()
        assert load.failures == []
        r = await client.post("/v2/repository/models/nope/unload", json={}, headers=MANAGE)
        assert r.status_code == 404
        bad = await client.post(
            "/v2/repository/models/linear/promote", json={"versio": "1"}, headers=MANAGE
        )
        assert bad.status_code == 400


# -- the management routes and their key -----------------------------------------------


async def test_management_is_off_by_default(tmp_path: Path) -> None:
    server = build_server(make_repo(tmp_path / "repo", "1"))
    with serving(InferenceApp(server)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=SAFETY) as c:
            for path in ("/v2/repository/index", "/v2/repository/models/linear/load"):
                for headers in ({}, MANAGE):
                    r = await c.post(path, json={}, headers=headers)
                    assert r.status_code == 404
                    assert "management is off" in r.json()["error"]
            spec = (await c.get("/openapi.json")).json()
            assert not [p for p in spec["paths"] if p.startswith("/v2/repository")]


async def test_management_needs_its_own_key(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", "1")
    async with managed(repo, api_key=APIKEY) as (_, _, client):
        infer = {"Authorization": f"Bearer {APIKEY}"}
        for headers in ({}, infer, {"Authorization": "Bearer wrong"}, {"Authorization": MKEY}):
            r = await client.post("/v2/repository/index", json={}, headers=headers)
            assert r.status_code == 401, headers
            assert r.headers["www-authenticate"] == "Bearer"
            assert MKEY not in r.text
        # ... and the management key does not open the inference routes.
        r = await client.post("/v2/models/linear/infer", json=infer_body([[1, 0]]), headers=MANAGE)
        assert r.status_code == 401
        r = await client.post("/v2/repository/index", json={"ready": True}, headers=MANAGE)
        assert r.status_code == 200
        assert r.json() == [
            {"name": "linear", "version": "1", "state": "READY", "reason": "", "default": True}
        ]
        assert (await client.get("/v2/repository/index", headers=MANAGE)).status_code == 405
        spec = (await client.get("/openapi.json")).json()
        from rtinfer.http import ROUTES
        from rtinfer.http.manage import MANAGEMENT_ROUTES

        documented = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
        routes = {(m, p) for m, p, _ in ROUTES if not p.startswith("/pipelines/")}
        assert documented == routes | set(MANAGEMENT_ROUTES)
        op = spec["paths"]["/v2/repository/models/{name}/promote"]["post"]
        assert op["security"] == [{"management": []}]


def test_the_management_key_must_differ_from_the_api_key(tmp_path: Path) -> None:
    server = build_server(make_repo(tmp_path / "repo", "1"))
    with pytest.raises(ValueError, match="must differ"):
        InferenceApp(server, api_key="same", management_key="same")


# -- rtinfer serve --management-key --watch, and rtinfer models -------------------------


@pytest.fixture(
    params=[(1, ()), (2, ()), (2, ("--model-process",))],
    ids=["one worker", "two workers", "two workers, one model process"],
)
def served_repo(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Path, str]]:
    """``rtinfer serve REPO --management-key --watch`` with one worker, or two (whose
    updates go to both through the management hub), their models in each or in one model
    process."""
    with serve_repo(tmp_path, *request.param) as (repo, url, _):
        yield repo, url


@contextlib.contextmanager
def serve_repo(
    tmp_path: Path, workers: int, options: tuple[str, ...] = ()
) -> Iterator[tuple[Path, str, int]]:
    """The repository (versions 1 and 2), the URL and the pid of ``rtinfer serve`` serving it."""
    repo = make_repo(tmp_path / "repo", "1", "2")
    port = free_port()
    env = {**os.environ, "RTINFER_API_KEY": "", "RTINFER_MANAGEMENT_KEY": ""}
    command = [
        sys.executable, "-m", "rtinfer", "serve", str(repo), "--port", str(port),
        "--management-key", MKEY, "--watch", "--watch-interval-s", "0.1",
        "--drain-s", "1", "--workers", str(workers), *options,
    ]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=SAFETY) as c:
            for _ in range(int(SAFETY * 4 / 0.05)):
                try:
                    if c.get("/v2/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.poll() is None, "the server exited"
                time.sleep(0.05)
            else:
                pytest.fail("the server never became ready")
        yield repo, url, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(SAFETY * 3) == 0


def versions_answering(url: str, requests: int = 24) -> set[str]:
    """The versions that answer ``requests`` requests, each on a new connection (the
    kernel spreads new connections over the workers)."""
    seen = set()
    for _ in range(requests):
        with httpx.Client(base_url=url, timeout=SAFETY) as c:
            r = c.post("/v2/models/linear/infer", json=infer_body([[0.25, 0]]))
            assert r.status_code == 200, r.text
            seen.add(r.json()["model_version"])
    return seen


#: A client that opens a new connection for each request (the kernel spreads new
#: connections over the workers).
NO_KEEP_ALIVE = httpx.Limits(max_keepalive_connections=0)


def versions_by_key(url: str, keys: list[str]) -> dict[str, str]:
    """The version that answers each routing key (``X-Routing-Key``), each on a new connection."""
    seen = {}
    with httpx.Client(base_url=url, timeout=SAFETY, limits=NO_KEEP_ALIVE) as c:
        for key in keys:
            r = c.post(
                "/v2/models/linear/infer",
                json=infer_body([[0.25, 0]]),
                headers={"X-Routing-Key": key},
            )
            assert r.status_code == 200, r.text
            seen[key] = r.json()["model_version"]
            np.testing.assert_allclose(
                r.json()["outputs"][0]["data"], expected(seen[key]), rtol=1e-6
            )
    return seen


def answers_naming(url: str, version: str, requests: int = 24) -> set[tuple[int, str | None]]:
    """The status and version of ``requests`` requests naming ``version``, each on a new
    connection (so that every worker answers some)."""
    seen = set()
    with httpx.Client(base_url=url, timeout=SAFETY, limits=NO_KEEP_ALIVE) as c:
        for _ in range(requests):
            r = c.post(f"/v2/models/linear/versions/{version}/infer", json=infer_body([[0.25, 0]]))
            seen.add((r.status_code, r.json().get("model_version")))
            if r.status_code == 200:
                np.testing.assert_allclose(
                    r.json()["outputs"][0]["data"], expected(version), rtol=1e-6
                )
    return seen


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any]:
    code = cli(["models", *args])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else err


@pytest.mark.timeout(90)
def test_rtinfer_models_against_rtinfer_serve(
    served_repo: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    repo, url = served_repo
    common = ("--url", url, "--key", MKEY)
    code, index = run_cli(capsys, "list", *common)
    assert code == 0
    assert [(e["version"], e["state"], e["default"]) for e in index] == [
        ("1", "READY", False),
        ("2", "READY", True),
    ]
    code, answer = run_cli(capsys, "promote", "linear", "1", "--keep-previous", *common)
    assert code == 0
    assert {e["version"]: e["default"] for e in answer["versions"]} == {"1": True, "2": False}
    assert versions_answering(url) == {"1"}  # in every worker
    code, error = run_cli(capsys, "list", "--url", url, "--key", "wrong")
    assert code == 1
    assert "401" in error
    assert "management key" in error
    code, error = run_cli(capsys, "unload", "linear", "1", *common)
    assert code == 1
    assert "409" in error
    code, answer = run_cli(capsys, "canary", "linear", "2", "10", *common)
    assert code == 0
    assert {e["version"]: e.get("canary_percent") for e in answer["versions"]} == {
        "1": None,
        "2": 10.0,
    }
    code, index = run_cli(capsys, "list", *common)
    assert [e.get("canary_percent") for e in index] == [None, 10.0]
    keys = [f"user-{i}" for i in range(60)]
    by_key = versions_by_key(url, keys)
    on_canary = sum(1 for v in by_key.values() if v == "2")
    assert set(by_key.values()) == {"1", "2"}
    assert on_canary < len(keys) / 2  # a share of about a tenth, not the whole
    assert versions_by_key(url, keys) == by_key  # sticky: a key keeps its version
    code, answer = run_cli(capsys, "canary", "linear", "2", "0", *common)
    assert code == 0
    assert all("canary_percent" not in e for e in answer["versions"])
    assert set(versions_by_key(url, keys).values()) == {"1"}
    # A shadow: version 2 gets a copy of what version 1 answers, and they differ.
    code, answer = run_cli(capsys, "shadow", "linear", "2", *common)
    assert code == 0
    assert {e["version"]: e.get("shadow", {}).get("version") for e in answer["versions"]} == {
        "1": None,
        "2": "2",
    }
    report: dict[str, Any] = {}
    for _ in range(int(SAFETY / 0.05)):
        assert versions_answering(url, 8) == {"1"}  # the default still answers every request
        code, index = run_cli(capsys, "list", *common)
        report = index[1]["shadow"]  # the counts of the worker that answered
        if report["mismatches"] > 0:
            break
    assert report["compared"] >= report["mismatches"] >= 1
    sample = report["samples"][-1]
    assert (sample["default_version"], sample["candidate_version"]) == ("1", "2")
    assert sample["max_abs_difference"] == pytest.approx(0.25)  # x = 0.25, scaled by 2 not 1
    code, answer = run_cli(capsys, "shadow", "linear", *common)  # no version: stop it
    assert code == 0
    assert all("shadow" not in e for e in answer["versions"])
    # Unload a version that is not the default, then load it back.
    code, answer = run_cli(capsys, "unload", "linear", "2", *common)
    assert code == 0
    assert {e["version"]: e["state"] for e in answer["versions"]} == {
        "1": "READY",
        "2": "UNAVAILABLE",  # on disk, not loaded
    }
    assert answers_naming(url, "2") == {(404, None)}  # in every worker
    code, answer = run_cli(capsys, "load", "linear", "2", *common)
    assert code == 0
    assert {e["version"]: (e["state"], e["default"]) for e in answer["versions"]} == {
        "1": ("READY", True),
        "2": ("READY", False),  # loaded, not promoted
    }
    assert answers_naming(url, "2") == {(200, "2")}
    assert versions_answering(url) == {"1"}
    # --watch in the real server: a new folder is loaded and, being the highest, promoted.
    add_version(repo, "3")
    for _ in range(int(SAFETY / 0.05)):
        if versions_answering(url, 8) == {"3"}:
            break
        time.sleep(0.05)
    assert versions_answering(url) == {"3"}
    with httpx.Client(base_url=url, timeout=SAFETY) as c:
        r = c.post("/v2/models/linear/infer", json=infer_body([[0.25, 0]]))
        np.testing.assert_allclose(r.json()["outputs"][0]["data"], expected("3"), rtol=1e-6)


@pytest.mark.timeout(90)
def test_a_worker_started_in_place_of_a_dead_one_serves_the_updates_before_it(
    tmp_path: Path,
) -> None:
    from test_http_server import worker_pids

    with serve_repo(tmp_path, 2) as (_, url, pid):
        started = time.monotonic()  # ready: the workers' clocks started before this
        with httpx.Client(base_url=url, timeout=SAFETY) as c:
            r = c.post(
                "/v2/repository/models/linear/promote", json={"version": "1"}, headers=MANAGE
            )
            assert r.status_code == 200, r.text
        assert versions_answering(url) == {"1"}
        # A worker that dies after its first 10 s is replaced (server.STEADY_S); sooner,
        # the server would stop.
        time.sleep(max(0.0, 10.5 - (time.monotonic() - started)))
        before = worker_pids(pid)
        os.kill(min(before), signal.SIGKILL)
        deadline = time.monotonic() + SAFETY * 3
        while len((after := worker_pids(pid)) - before) == 0 or len(after) < 2:
            assert time.monotonic() < deadline, "the dead worker was not replaced"
            time.sleep(0.05)
        for _ in range(int(SAFETY * 3 / 0.05)):  # the new one turns ready, then listens
            try:
                if versions_answering(url, 8) == {"1"}:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        assert versions_answering(url, 32) == {"1"}  # not version 2, the highest on disk


def test_serve_checks_the_management_key(tmp_path: Path) -> None:
    from rtinfer.exceptions import ConfigError
    from rtinfer.serve import run_server

    repo = make_repo(tmp_path / "repo", "1")
    with pytest.raises(ConfigError, match="must differ"):
        run_server(repo, api_key="k", management_key="k")
    with pytest.raises(ConfigError, match="--watch follows a model repository"):
        run_server(repo / "linear" / "1" / "model.onnx", watch_s=2.0)
