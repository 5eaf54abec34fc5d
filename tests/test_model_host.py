"""The model host: one model in a process of its own, called by every serving worker.

The host and its callers talk over a real Unix socket; the end-to-end test runs
``rtinfer serve --workers 2 --model-process`` and sends it HTTP requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from conftest import SAFETY, wait_until
from faults_helpers import free_port
from rtinfer.exceptions import (
    ConfigError,
    DeadlineExceeded,
    ModelError,
    ModelInputError,
    ModelLoadError,
)
from rtinfer.http import InferenceApp
from rtinfer.models import OnnxModel, PythonModel, load_model, tensor
from rtinfer.models import host as host_module
from rtinfer.models.base import CALL_DEADLINE
from rtinfer.models.host import HostedModel, HostProcess, ModelHost, hosted_loader
from rtinfer.repository import ModelManager, ModelRepository
from rtinfer.serve import build_server, run_server
from rtinfer.serving import ModelPolicy, ModelServer
from rtinfer.types import Arrays, Model
from test_http import serving
from test_http_server import worker_pids
from test_repository import MKEY, Load, add_version, expected, make_repo, write_model
from test_serve_pipeline import write_pipeline

KEY = b"k" * 32


@pytest.fixture
def address(tmp_path: Path) -> str:
    return str(tmp_path / "model.sock")


@pytest.fixture
def hosting(address: str) -> Iterator[Any]:
    """Start a ModelHost on a thread for a loaded model; every host is closed after."""
    hosts: list[ModelHost] = []

    def start(model: Model, *, threads: int = 1) -> ModelHost:
        model.load()
        served = ModelHost(model, address, KEY, threads=threads)
        served.start()
        hosts.append(served)
        return served

    yield start
    for served in hosts:
        served.close()


def test_a_hosted_model_answers_as_the_model_itself(
    model_file: Path, address: str, hosting: Any
) -> None:
    local = OnnxModel(model_file)
    local.load()
    hosting(OnnxModel(model_file))
    remote = HostedModel(address, KEY, name="linear")
    remote.load()
    assert (remote.name, remote.version) == (local.name, local.version)
    assert remote.inputs == local.inputs
    assert remote.outputs == local.outputs
    features = np.array([[0.25, 0.5], [0.75, 0.0], [1.0, 1.0]], np.float32)
    answer = remote.predict({"features": features})
    expected = local.predict({"features": features})
    np.testing.assert_array_equal(answer["probabilities"], expected["probabilities"])
    assert answer["probabilities"].dtype == np.float32
    answer["probabilities"][0, 0] = 9.0  # writable, as an answer in-process is


def test_a_hosted_model_warms_up_with_one_call(
    model_file: Path, address: str, hosting: Any
) -> None:
    """The host warmed its model when it loaded it; the calls of a worker's warm-up run
    on the model threads that serve every worker, so it sends one, the smallest."""
    host = hosting(OnnxModel(model_file))
    remote = HostedModel(address, KEY)
    remote.load()
    remote.warmup([4, 1, 256])
    assert (host.calls, host.runs) == (1, 1)


def test_string_tensors_cross_both_ways(address: str, hosting: Any) -> None:
    def shout(inputs: Arrays) -> Arrays:
        words = inputs["words"]
        return {"loud": np.array([w.upper() for w in words.ravel()], dtype=object)}

    hosting(PythonModel(shout, inputs=[tensor("words", object, [None])], name="shout"))
    remote = HostedModel(address, KEY)
    remote.load()
    assert remote.name == "shout"
    answer = remote.predict({"words": np.array(["a", "élan", ""], dtype=object)})
    assert answer["loud"].dtype == object
    assert answer["loud"].tolist() == ["A", "ÉLAN", ""]


def _picky(inputs: Arrays) -> Arrays:
    x = inputs["x"]
    if (x < 0).any():
        raise ModelInputError("negative x")
    if (x > 100).any():
        raise RuntimeError("x out of range")
    return {"y": x * 2}


def test_a_failing_call_fails_alone(address: str, hosting: Any) -> None:
    hosting(PythonModel(_picky, inputs=[tensor("x", "float64", [None])], name="picky"))
    remote = HostedModel(address, KEY)
    remote.load()
    with pytest.raises(ModelInputError, match="negative x"):
        remote.predict({"x": np.array([-1.0])})
    with pytest.raises(ModelError, match="RuntimeError: x out of range"):
        remote.predict({"x": np.array([101.0])})
    np.testing.assert_array_equal(remote.predict({"x": np.array([1.5])})["y"], [3.0])


def test_a_caller_without_the_key_is_refused_and_others_go_on(
    model_file: Path, address: str, hosting: Any
) -> None:
    hosting(OnnxModel(model_file))
    with pytest.raises(ModelLoadError, match="refused this process"):
        HostedModel(address, b"x" * 32).load()
    remote = HostedModel(address, KEY)
    remote.load()
    assert remote.predict({"features": np.zeros((1, 2), np.float32)})["probabilities"].shape == (
        1,
        2,
    )


def test_no_host_is_a_load_error_that_says_so(address: str) -> None:
    with pytest.raises(ModelLoadError, match=r"cannot reach the model host.*is it running"):
        HostedModel(address, KEY).load()


@pytest.mark.parametrize("threads", [1, 2])
def test_the_host_runs_at_most_its_threads_at_once(
    address: str, hosting: Any, threads: int
) -> None:
    lock = threading.Lock()
    running = [0]
    most = [0]

    def slow(inputs: Arrays) -> Arrays:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return {"y": inputs["x"]}

    hosting(
        PythonModel(slow, inputs=[tensor("x", "float64", [None])], name="slow"), threads=threads
    )
    remote = HostedModel(address, KEY)
    remote.load()  # one warm-up call in load: the count starts after it
    most[0] = 0
    errors: list[BaseException] = []

    def caller() -> None:
        try:
            for _ in range(3):
                remote.predict({"x": np.ones(2)})  # each thread has its own connection
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    callers = [threading.Thread(target=caller) for _ in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(SAFETY)
    assert not errors
    assert most[0] == threads


def _held_calls(
    address: str, inputs: list[float], *, merge: bool = True
) -> tuple[list[Any], ModelHost]:
    """Call a host with each of ``inputs`` (a row each) on threads of their own, while its
    model is held by a first call until all of them wait: what each got back, and the host.

    The model answers ``y = 10 x`` and fails a call that holds a negative ``x``."""
    gate = threading.Event()
    running = threading.Event()

    def predict(batch: Arrays) -> Arrays:
        x = batch["x"]
        running.set()
        gate.wait(SAFETY)
        if (x < 0).any():
            raise RuntimeError(f"negative x in a call of {len(x)} rows")
        return {"y": x * 10}

    model = PythonModel(
        predict,
        inputs=[tensor("x", "float64", [None])],
        outputs=[tensor("y", "float64", [None])],
        name="gated",
    )
    host = ModelHost(model, address, KEY, merge=merge)
    results: list[Any] = [None] * (len(inputs) + 1)  # the first call's last

    def call(i: int, x: float) -> None:
        try:
            results[i] = host.predict({"x": np.array([x])})["y"].tolist()
        except RuntimeError as exc:  # the model's own error (the wire wraps it)
            results[i] = exc

    _queue_behind_a_held_call(
        host,
        gate,
        running,
        lambda: call(len(inputs), 0.0),
        [lambda i=i, x=x: call(i, x) for i, x in enumerate(inputs)],
    )
    assert results[-1] == [0.0]
    return results[:-1], host


def _queue_behind_a_held_call(
    host: ModelHost,
    gate: threading.Event,
    running: threading.Event,
    first: Any,
    others: list[Any],
) -> None:
    """Run ``first`` on a thread until its model call holds the host's model thread
    (``running`` set, ``gate`` held), then each of ``others`` on a thread of its own until
    all of them wait in the host; then open ``gate``, wait for every call, close ``host``."""
    threads = [threading.Thread(target=first)]
    try:
        threads[0].start()
        assert running.wait(SAFETY)  # the first call holds the model: the others queue
        threads += [threading.Thread(target=call) for call in others]
        for thread in threads[1:]:
            thread.start()
        wait_for(lambda: host.waiting == len(others), "the calls queueing")
        gate.set()
        for thread in threads:
            thread.join(SAFETY)
    finally:
        gate.set()
        host.close()


def test_calls_waiting_for_the_model_run_as_one_and_each_gets_its_rows(address: str) -> None:
    results, host = _held_calls(address, [1.0, 2.0, 3.0, 4.0])
    assert results == [[10.0], [20.0], [30.0], [40.0]]
    assert (host.runs, host.calls) == (2, 5)  # the first alone, then four as one


def test_a_merged_call_that_fails_is_run_call_by_call(address: str) -> None:
    results, host = _held_calls(address, [1.0, -2.0, 3.0])
    assert results[0] == [10.0]
    assert isinstance(results[1], RuntimeError)
    assert str(results[1]) == "negative x in a call of 1 rows"  # its own call, alone
    assert results[2] == [30.0]
    assert (host.runs, host.calls) == (5, 4)  # one alone, three as one, then one by one


def test_a_call_whose_deadline_has_passed_when_its_turn_comes_is_not_run(address: str) -> None:
    gate, running = threading.Event(), threading.Event()
    seen: list[float] = []

    def predict(batch: Arrays) -> Arrays:
        seen.extend(batch["x"].tolist())
        running.set()
        gate.wait(SAFETY)
        return {"y": batch["x"] * 10}

    model = PythonModel(
        predict, inputs=[tensor("x", "float64", [None])], outputs=[tensor("y", "float64", [None])]
    )
    host = ModelHost(model, address, KEY)
    results: dict[float, Any] = {}

    def call(x: float, deadline: float | None) -> None:
        try:
            results[x] = host.predict({"x": np.array([x])}, None, deadline)["y"].tolist()
        except DeadlineExceeded as exc:
            results[x] = exc

    past, future = time.time() - 1, time.time() + 3600
    plan = [(1.0, future), (2.0, past), (3.0, None)]
    _queue_behind_a_held_call(
        host, gate, running, lambda: call(0.0, None), [lambda a=a: call(*a) for a in plan]
    )
    assert results[1.0] == [10.0]
    assert results[3.0] == [30.0]
    assert isinstance(results[2.0], DeadlineExceeded)
    assert "waiting in the model host" in str(results[2.0])
    assert seen == [0.0, 1.0, 3.0]  # never given to the model
    assert (host.expired, host.runs) == (1, 2)


def test_the_batchs_deadline_crosses_to_the_host(address: str, hosting: Any) -> None:
    """A worker's call carries its batch's deadline (``CALL_DEADLINE``, which the
    micro-batcher sets); the host's refusal comes back as :class:`DeadlineExceeded`."""
    hosting(PythonModel(lambda b: {"y": b["x"]}, inputs=[tensor("x", "float64", [None])]))
    remote = HostedModel(address, KEY)
    remote.load()

    def within(deadline: float) -> Arrays:
        CALL_DEADLINE.set(deadline)
        return remote.predict({"x": np.ones(2)})

    assert contextvars.copy_context().run(within, time.time() + 3600)["y"].tolist() == [1, 1]
    with pytest.raises(DeadlineExceeded, match="not run"):
        contextvars.copy_context().run(within, time.time() - 1)


def test_without_merging_each_call_runs_alone(address: str) -> None:
    results, host = _held_calls(address, [1.0, 2.0, 3.0], merge=False)
    assert results == [[10.0], [20.0], [30.0]]
    assert (host.runs, host.calls) == (4, 4)


def test_calls_fail_while_the_host_is_gone_and_reconnect_when_it_is_back(
    model_file: Path, address: str, hosting: Any
) -> None:
    first = hosting(OnnxModel(model_file))
    remote = HostedModel(address, KEY)
    remote.load()
    features = {"features": np.array([[0.25, 0.0]], np.float32)}
    remote.predict(features)
    first.close()
    with pytest.raises(ModelError, match=r"hung up|cannot reach"):
        remote.predict(features)
    hosting(OnnxModel(model_file))
    np.testing.assert_allclose(remote.predict(features)["probabilities"], [[0.75, 0.25]])


async def test_a_served_hosted_model_falls_back_while_its_host_is_gone(
    model_file: Path, address: str, hosting: Any
) -> None:
    first = hosting(OnnxModel(model_file))
    server = ModelServer()
    policy = ModelPolicy(breaker_failures=100, default={"probabilities": [1.0, 0.0]})
    server.add(HostedModel(address, KEY, name="linear"), policy=policy)
    await server.start()
    features = {"features": np.array([[0.25, 0.0]], np.float32)}
    try:
        answer = await server.infer("linear", features)
        assert answer.step == "primary"
        np.testing.assert_allclose(answer.outputs["probabilities"], [[0.75, 0.25]])
        first.close()  # the host goes away: the model fails, its fallback answers
        answer = await server.infer("linear", features)
        assert answer.step == "default"
        np.testing.assert_allclose(answer.outputs["probabilities"], [[1.0, 0.0]])
        hosting(OnnxModel(model_file))  # back: the next call reconnects
        answer = await server.infer("linear", features)
        assert answer.step == "primary"
        np.testing.assert_allclose(answer.outputs["probabilities"], [[0.75, 0.25]])
    finally:
        await server.aclose()


def test_a_host_process_serves_restarts_and_cleans_up(
    model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host_module, "STEADY_S", 0.0)  # no pause before the restart
    hosted = HostProcess(model_file)
    hosted.start()
    try:
        remote = HostedModel(hosted.address, hosted.authkey)
        remote.load()
        features = {"features": np.array([[0.5, 0.0]], np.float32)}
        np.testing.assert_allclose(remote.predict(features)["probabilities"], [[0.5, 0.5]])
        os.kill(hosted._process.pid, signal.SIGKILL)
        deadline = time.monotonic() + SAFETY * 3
        while hosted.restarts == 0:
            assert time.monotonic() < deadline, "the host was not started again"
            time.sleep(0.02)
        with pytest.raises(ModelError, match="hung up"):  # the old connection is dead
            remote.predict(features)
        np.testing.assert_allclose(remote.predict(features)["probabilities"], [[0.5, 0.5]])
        process = hosted._process
    finally:
        hosted.stop()
    assert process.exitcode is not None
    assert hosted.calls == 1  # the new host's one call: the killed one's are lost with it
    assert not Path(hosted.address).parent.exists()


def test_a_host_that_cannot_be_started_again_is_retried_until_it_can(
    model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    monkeypatch.setattr(host_module, "STEADY_S", 0.2)  # the pause between two tries
    model = tmp_path / "linear.onnx"
    model.write_bytes(model_file.read_bytes())
    hosted = HostProcess(model)
    hosted.start()
    try:
        model.rename(tmp_path / "away.onnx")  # a restart cannot load it now
        os.kill(hosted._process.pid, signal.SIGKILL)
        deadline = time.monotonic() + SAFETY * 3
        while "could not load" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.02)
        assert hosted.restarts == 0
        (tmp_path / "away.onnx").rename(model)
        while hosted.restarts == 0:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.02)
        remote = HostedModel(hosted.address, hosted.authkey)
        remote.load()
        answer = remote.predict({"features": np.array([[0.5, 0.0]], np.float32)})
        np.testing.assert_allclose(answer["probabilities"], [[0.5, 0.5]])
    finally:
        hosted.stop()


def test_a_host_process_that_cannot_load_says_why(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    hosted = HostProcess(broken)
    try:
        with pytest.raises(ModelLoadError, match=r"could not load .*broken\.onnx.*ModelLoadError"):
            hosted.start()
    finally:
        hosted.stop()


def test_model_process_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--model-threads must be at least 1"):
        run_server(tmp_path, model_process=True, model_threads=0)
    with pytest.raises(ConfigError, match="add --model-process"):
        run_server(tmp_path, model_threads=2)
    with pytest.raises(ModelLoadError, match="no model file, repository folder or pipeline"):
        HostProcess(tmp_path / "nothing.onnx")


def scoring_pipeline(tmp_path: Path, model: Path) -> Path:
    """test_serve_pipeline's scoring pipeline, with a fallback model (a copy of the model,
    ``light.onnx``) and the model named by a path relative to the current folder."""
    fallback = tmp_path / "light.onnx"
    fallback.write_bytes(model.read_bytes())
    path = write_pipeline(tmp_path, model)
    text = path.read_text().replace(f"path: {model}", f"path: {os.path.relpath(model)}")
    text = text.replace(
        '  version: "1"\n',
        f'  version: "1"\n  fallback:\n    - {{path: {fallback}, name: light}}\n',
    )
    path.write_text(text)
    return path


def test_a_pipelines_model_process_loads_the_files_it_names_and_no_other(
    model_file: Path, tmp_path: Path
) -> None:
    hosted = HostProcess(scoring_pipeline(tmp_path, model_file))
    fallback = tmp_path / "light.onnx"
    other = tmp_path / "other.onnx"
    other.write_bytes(model_file.read_bytes())
    hosted.start()
    try:
        load = hosted_loader(hosted.address, hosted.authkey)
        inputs = {"features": np.array([[0.25, 0.0]], np.float32)}
        for path in (os.path.relpath(model_file), fallback):
            model = load(path)
            model.load()
            np.testing.assert_allclose(model.predict(inputs)["probabilities"], [[0.75, 0.25]])
        stranger = load(other)
        with pytest.raises(ModelLoadError, match=r"lies outside .*, the only places this model"):
            stranger.load()
    finally:
        hosted.stop()
    assert (hosted.loads, hosted.restarts) == (2, 0)  # loaded as named: nothing held
    # A pipeline whose model comes from a factory leaves it nothing to load.
    factory = tmp_path / "factory.yaml"
    text = scoring_pipeline(tmp_path, model_file).read_text()
    text = text.replace(f"path: {os.path.relpath(model_file)}", "factory: 'models:make'")
    light = f"{{path: {tmp_path / 'light.onnx'}, name: light}}"
    factory.write_text(text.replace(light, "{default: {probabilities: [1.0, 0.0]}}"))
    with pytest.raises(ModelLoadError, match="names no model file by path"):
        HostProcess(factory)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def infer_body(x: float) -> dict[str, Any]:
    return {"inputs": [{"name": "features", "shape": [1, 2], "datatype": "FP32", "data": [x, 0]}]}


@contextlib.asynccontextmanager
async def serve_process(
    tmp_path: Path, target: Path, *options: str
) -> AsyncIterator[tuple[httpx.AsyncClient, set[int]]]:
    """``rtinfer serve TARGET --workers 2 --model-process OPTIONS`` in a process group: a
    client once it is ready, and the pids of its workers and host (filled in by the
    caller). Stopped as a service manager stops it: SIGTERM to the whole group, after
    which it must exit cleanly, leaving no worker or host behind."""
    port = free_port()
    spawned: set[int] = set()
    command = [
        sys.executable, "-m", "rtinfer", "serve", str(target), "--port", str(port),
        "--workers", "2", "--model-process", "--summary-json", str(tmp_path / "summary.json"),
        *options,
    ]  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *command,
            env={**os.environ, "RTINFER_API_KEY": ""},
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=SAFETY) as c:
            for _ in range(int(SAFETY * 6 / 0.05)):
                try:
                    if (await c.get("/v2/health/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.returncode is None, log.read_text()
                await asyncio.sleep(0.05)
            spawned.update(worker_pids(process.pid))
            assert len(spawned) == 3, spawned  # two workers and the host
            yield c, spawned
        # SIGTERM to the whole group, as a terminal or a service manager sends it: the
        # workers drain, the host waits for them, the server exits cleanly.
        os.killpg(process.pid, signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), SAFETY * 3) == 0, log.read_text()
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    assert not [pid for pid in spawned if _alive(pid)], "a worker or the host outlived the server"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("http_server", ["rtinfer", "uvicorn"])
async def test_rtinfer_serve_workers_call_one_model_process(
    model_file: Path, tmp_path: Path, http_server: str
) -> None:
    options = ("--model-threads", "2", "--http-server", http_server)
    async with serve_process(tmp_path, model_file, *options) as (client, _):
        answers = await asyncio.gather(
            *(client.post("/v2/models/linear/infer", json=infer_body(i / 20)) for i in range(20))
        )
        assert [a.status_code for a in answers] == [200] * 20, answers[0].text
        for i, answer in enumerate(answers):
            data = answer.json()["outputs"][0]["data"]
            assert data == pytest.approx([1 - i / 20, i / 20], abs=1e-6)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["workers"] == 2
    hosted = summary["model_process"]
    assert (hosted["threads"], hosted["restarts"], hosted["model_loads"]) == (2, 0, 1)
    # Every batch of both workers, a warm-up call each included, and at most one model
    # call each.
    assert hosted["worker_calls"] >= 3
    assert 1 <= hosted["model_calls"] <= hosted["worker_calls"]
    assert summary["requests"] >= 20


def test_a_pipelines_model_process_unpickles_only_what_the_pipeline_allows(
    model_file: Path, tmp_path: Path
) -> None:
    """``allow_pickle: true`` on a pipeline's model lets the host unpickle that file (the
    pipeline's author vouches for it); its fallback model, without, stays refused."""
    import joblib
    from sklearn.linear_model import LogisticRegression

    rows = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
    logistic = LogisticRegression().fit(rows, [0, 1, 0, 1])
    trusted, untrusted = tmp_path / "trusted.joblib", tmp_path / "untrusted.joblib"
    joblib.dump(logistic, trusted)
    joblib.dump(logistic, untrusted)
    pipeline = scoring_pipeline(tmp_path, model_file)
    text = pipeline.read_text().replace(f"path: {os.path.relpath(model_file)}", f"path: {trusted}")
    text = text.replace('  version: "1"\n', '  version: "1"\n  allow_pickle: true\n')
    pipeline.write_text(text.replace(str(tmp_path / "light.onnx"), str(untrusted)))
    hosted = HostProcess(pipeline)  # allow_pickle=False: rtinfer serve's own say
    hosted.start()
    try:
        load = hosted_loader(hosted.address, hosted.authkey)
        model = load(trusted)
        model.load()
        got = model.predict({"features": rows})["probabilities"]
        np.testing.assert_allclose(got, logistic.predict_proba(rows), atol=1e-5)
        with pytest.raises(ModelLoadError, match="allow_pickle"):
            load(untrusted).load()
    finally:
        hosted.stop()


@pytest.mark.timeout(120)
async def test_rtinfer_serve_a_pipeline_through_one_model_process(
    model_file: Path, tmp_path: Path
) -> None:
    """Both workers score through the host: the pipeline's model and its fallback model
    are each loaded once, for both."""
    pipeline = scoring_pipeline(tmp_path, model_file)
    async with serve_process(tmp_path, pipeline) as (client, _):
        answers = await asyncio.gather(
            *(
                client.post("/pipelines/scoring/score", json={"id": f"e{i}", "x": i / 20, "y": 0})
                for i in range(20)
            )
        )
        for i, answer in enumerate(answers):
            assert answer.status_code == 200, answer.text
            (got,) = answer.json()["results"]
            assert got["score"] == pytest.approx(i / 20, abs=1e-6)
            assert (got["step"], got["model_version"]) == ("primary", "1")
    hosted = json.loads((tmp_path / "summary.json").read_text())["model_process"]
    loads = (hosted["restarts"], hosted["model_loads"], hosted["model_unloads"])
    # Seen once in CI (session 12): three loads and unloads. The log says which file and when.
    assert loads == (0, 2, 2), (tmp_path / "serve.log").read_text()[-6000:]
    # a warm-up call a model a worker (4), and the scoring, in batches of the requests
    assert hosted["worker_calls"] >= 5


@pytest.mark.timeout(120)
async def test_rtinfer_serve_a_repository_through_one_model_process(tmp_path: Path) -> None:
    """Both workers serve the repository's versions from the host, and follow a new
    version through it (``--watch``)."""
    repo = make_repo(tmp_path / "repo", "1")
    async with serve_process(tmp_path, repo, "--watch", "--watch-interval-s", "0.1") as (client, _):
        body = infer_body(0.25)
        answers = await asyncio.gather(
            *(client.post("/v2/models/linear/infer", json=body) for _ in range(20))
        )
        for answer in answers:
            assert answer.status_code == 200, answer.text
            assert answer.json()["model_version"] == "1"
        add_version(repo, "2")
        seen: set[str] = set()
        for _ in range(int(SAFETY * 3 / 0.05)):
            # Both workers answer from version 2 (connections land on either).
            answers = await asyncio.gather(
                *(client.post("/v2/models/linear/infer", json=body) for _ in range(8))
            )
            seen = {a.json()["model_version"] for a in answers if a.status_code == 200}
            if seen == {"2"} and all(a.status_code == 200 for a in answers):
                break
            await asyncio.sleep(0.05)
        assert seen == {"2"}
        data = answers[0].json()["outputs"][0]["data"]
        np.testing.assert_allclose(data, expected("2"), rtol=1e-6)
    hosted = json.loads((tmp_path / "summary.json").read_text())["model_process"]
    assert hosted["restarts"] == 0
    # a warm-up call a version a worker (4), a batch of the first requests at least, and
    # one of each later round
    assert hosted["worker_calls"] >= 6
    # Each version loaded once for both workers, and let go once both had let go of it
    # (version 1 when they retired it, version 2 when they exited).
    assert (hosted["model_loads"], hosted["model_unloads"]) == (2, 2)


# -- a repository: files named by the workers ----------------------------------------------


def _call_on_thread(model: HostedModel, inputs: Arrays) -> Arrays:
    """``model.predict`` on a thread that then ends: its connection closes with it, as a
    batcher's model thread's does when the batcher closes."""
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(model.predict(inputs)))
    thread.start()
    thread.join(SAFETY)
    assert got, "the call did not return"
    return dict(got[0])


def test_a_host_loads_a_file_once_for_its_callers_and_lets_it_go_after_the_last(
    tmp_path: Path,
) -> None:
    repo = make_repo(tmp_path / "repo", "1", "2")
    host = ModelHost(None, str(tmp_path / "h.sock"), KEY, load=load_model, root=repo)
    host.start()
    try:
        one = repo / "linear" / "1" / "model.onnx"
        workers = [HostedModel(host.address, KEY, path=one, name="linear", version="1")] * 2
        workers[1] = HostedModel(host.address, KEY, path=one, name="linear", version="1")
        for remote in workers:
            remote.load()  # each opens the file: loaded once
            assert (remote.name, remote.version) == ("linear", "1")
        two = HostedModel(
            host.address, KEY, path=repo / "linear" / "2" / "model.onnx", name="linear", version="2"
        )
        two.load()
        assert (host.loads, sorted(host.models)) == (2, [("linear", "1"), ("linear", "2")])
        x = {"features": np.array([[0.25, 0.0]], np.float32)}
        for remote, version in [(workers[0], "1"), (two, "2"), (workers[1], "1")]:
            answer = _call_on_thread(remote, x)["probabilities"]
            np.testing.assert_allclose(answer, [expected(version)], rtol=1e-6)
        assert host.loads == 2
        # Version 2's last connection closes (its caller's thread is gone): let go.
        two._hang_up()
        wait_for(lambda: host.models == [("linear", "1")], "version 2 let go")
        for remote in workers:
            remote._hang_up()
        wait_for(lambda: host.models == [], "version 1 let go")
        assert host.unloads == 2
        # Named again, it is loaded again.
        np.testing.assert_allclose(
            _call_on_thread(workers[0], x)["probabilities"], [expected("1")], rtol=1e-6
        )
        assert host.loads == 3
        # Only files under the root (as named: a version folder may link elsewhere), and
        # ones that load.
        with pytest.raises(ModelLoadError, match="lies outside"):
            HostedModel(host.address, KEY, path=tmp_path / "elsewhere.onnx").load()
        with pytest.raises(ModelLoadError, match="lies outside"):
            HostedModel(host.address, KEY, path=repo / ".." / "elsewhere.onnx").load()
        (repo / "linear" / "3").symlink_to(write_model(tmp_path / "deployed" / "3", 3.0))
        linked = HostedModel(host.address, KEY, path=repo / "linear" / "3" / "model.onnx")
        np.testing.assert_allclose(
            _call_on_thread(linked, x)["probabilities"], [expected("3")], rtol=1e-6
        )
        with pytest.raises(ModelLoadError, match=r"could not load .*nothing\.onnx"):
            HostedModel(host.address, KEY, path=repo / "nothing.onnx").load()
        (repo / "broken.onnx").write_bytes(b"not a model")
        with pytest.raises(ModelLoadError, match=r"could not load .*broken\.onnx.*ModelLoadError"):
            HostedModel(host.address, KEY, path=repo / "broken.onnx").load()
        with pytest.raises(ModelLoadError, match="no model of its own"):
            HostedModel(host.address, KEY).load()
    finally:
        host.close()


def test_waiting_calls_merge_per_model_only(tmp_path: Path) -> None:
    """Two models with the same tensors: calls queued in turn to each are merged with the
    calls to their own model, never with the other's, and each gets its own answer."""
    gate = threading.Event()
    running = threading.Event()

    def build(path: Path, **_: Any) -> PythonModel:
        scale = float(path.stem)

        def predict(batch: Arrays) -> Arrays:
            running.set()
            gate.wait(SAFETY)
            return {"y": batch["x"] * scale}

        return PythonModel(predict, inputs=[tensor("x", "float64", [None])], name=path.stem)

    for name in ("10", "100"):
        (tmp_path / f"{name}.model").touch()
    gate.set()  # the loads' warm-ups run freely
    host = ModelHost(None, str(tmp_path / "h.sock"), KEY, load=build, root=tmp_path)
    ten = host.open(host_module._Open(str(tmp_path / "10.model")))
    hundred = host.open(host_module._Open(str(tmp_path / "100.model")))
    gate.clear()
    results: dict[int, Any] = {}

    def call(i: int, slot: Any) -> None:
        results[i] = host.predict({"x": np.array([float(i)])}, slot)["y"].tolist()

    others = [lambda i=i: call(i, ten if i % 2 else hundred) for i in range(1, 7)]
    _queue_behind_a_held_call(host, gate, running, lambda: call(0, ten), others)
    assert results == {i: [i * (10.0 if i % 2 or i == 0 else 100.0)] for i in range(7)}
    assert (host.runs, host.calls) == (3, 7)  # the first, then each model's three as one


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + SAFETY
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


async def test_a_repository_through_the_host_reloads_under_load_with_no_failure(
    tmp_path: Path,
) -> None:
    """The watch loads a new version through the host, promotes it with no failed
    request, and the host lets the old one go once its batcher has closed."""
    repo = make_repo(tmp_path / "repo", "1")
    host = ModelHost(None, str(tmp_path / "h.sock"), KEY, load=load_model, root=repo)
    host.start()
    load = hosted_loader(host.address, KEY)
    server = build_server(repo, load=load)
    manager = ModelManager(
        server, ModelRepository(repo, load=load), retire_grace_s=0.05, watch_s=0.05
    )
    app = InferenceApp(server, manager=manager, management_key=MKEY)
    try:
        with serving(app) as url:
            async with httpx.AsyncClient(base_url=url, timeout=SAFETY) as client:
                assert host.models == [("linear", "1")]
                old = server.get("linear")
                traffic = Load(client)
                await wait_until(lambda: traffic.count("1") >= 20, "requests on version 1")
                add_version(repo, "2")
                await wait_until(lambda: traffic.count("2") >= 40, "version 2 promoted")
                await wait_until(lambda: not old.batcher.ready, "the old version closed")
                await traffic.stop()
                traffic.check("1", "2")
                await wait_until(lambda: host.models == [("linear", "2")], "version 1 let go")
                assert (host.loads, host.unloads) == (2, 1)
    finally:
        host.close()
