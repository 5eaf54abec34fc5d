"""Management across workers: the hub sends each update to every worker, and a worker that
joins later applies the updates that took before it.

Three "workers" here are three model servers with their managers in this process, each
with its own connections to a real hub over its Unix socket.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from rtinfer.http.control import ControlHub, ControlMember
from rtinfer.http.errors import HttpError
from rtinfer.http.manage import Management
from rtinfer.repository import ModelManager, ModelRepository
from rtinfer.serve import build_server
from test_repository import make_repo, write_model

ROUTE = "/v2/repository/models/{name}/"


@pytest.fixture
def hub() -> Any:
    control = ControlHub()
    control.start()
    yield control
    control.stop()


@contextlib.asynccontextmanager
async def worker(hub: ControlHub, repo: Path) -> AsyncIterator[Management]:
    """A worker serving ``repo``, its management joined to ``hub``."""
    server = build_server(repo)
    manager = ModelManager(server, ModelRepository(repo), retire_grace_s=0.01)
    management = Management(manager, "key")
    await server.start()
    await manager.start()
    member = ControlMember(hub.address, hub.authkey, management)
    try:
        await member.join()
        management.control = member
        yield management
    finally:
        member.close()
        await manager.aclose()
        await server.aclose()


async def update(management: Management, action: str, body: str) -> Any:
    return await management.handle(ROUTE + action, {"name": "linear"}, body.encode())


def default(management: Management) -> str:
    return management.manager.server.get("linear").version


async def test_every_worker_applies_an_update_and_a_late_one_catches_up(
    tmp_path: Path, hub: ControlHub
) -> None:
    repo = make_repo(tmp_path / "repo", "1", "2")
    async with worker(hub, repo) as a, worker(hub, repo) as b:
        assert [default(a), default(b)] == ["2", "2"]  # each starts on the highest
        status, answer = await update(a, "promote", '{"version": "1", "keep_previous": true}')
        assert status == 200
        assert {e["version"]: e["default"] for e in answer["versions"]} == {"1": True, "2": False}
        assert [default(a), default(b)] == ["1", "1"]
        await update(b, "canary", '{"version": "2", "percent": 25}')
        assert [m.manager.server.canaries["linear"].percent for m in (a, b)] == [25.0, 25.0]
        # A refusal everywhere is answered as the route would, and not kept.
        with pytest.raises(HttpError) as refused:
            await update(a, "unload", '{"version": "1"}')
        assert refused.value.status == 409
        assert [u.action for u in hub.updates] == ["promote", "canary"]
        # A worker that joins now (one started in place of a worker that died) applies
        # what took before it turns ready.
        async with worker(hub, repo) as c:
            assert default(c) == "1"
            assert c.manager.server.canaries["linear"].percent == 25.0
            assert len(hub.members) == 3
            await update(c, "canary", '{"version": "2", "percent": 0}')
            assert all("linear" not in m.manager.server.canaries for m in (a, b, c))
        await update(a, "promote", '{"version": "2"}')  # c is gone: the others go on
        assert [default(a), default(b)] == ["2", "2"]
        assert len(hub.members) == 2


async def test_an_update_that_takes_in_some_workers_only_says_so(
    tmp_path: Path, hub: ControlHub
) -> None:
    repo = make_repo(tmp_path / "repo", "1")
    other = make_repo(tmp_path / "other", "1")  # a worker that sees other files
    async with worker(hub, repo) as a, worker(hub, other) as b:
        write_model(repo / "linear" / "3", 3.0)
        with pytest.raises(HttpError) as failed:
            await update(a, "load", '{"version": "3", "promote": true}')
        assert failed.value.status == 404
        assert "has no version '3'" in failed.value.message
        assert "the update took in 1 of 2 workers" in failed.value.message
        assert [default(a), default(b)] == ["3", "1"]
        assert [u.action for u in hub.updates] == ["load"]  # kept: a later worker loads it


async def test_a_worker_without_its_hub_refuses_updates_clearly(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", "1")
    hub = ControlHub()
    hub.start()
    async with worker(hub, repo) as a:
        hub.stop()
        with pytest.raises(HttpError) as refused:
            await update(a, "promote", '{"version": "1"}')
        assert refused.value.status == 503
        assert "management hub" in refused.value.message
