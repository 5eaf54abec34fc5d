"""Model management over HTTP: the Open Inference Protocol's repository extension, and more.

Routes (all ``POST``, JSON bodies, every field optional unless said)::

    /v2/repository/index                       {"ready": bool}  -> every version, its state
    /v2/repository/models/{name}/load          {"version", "promote": bool}
    /v2/repository/models/{name}/unload        {"version", "force": bool}
    /v2/repository/models/{name}/promote       {"version" (required), "keep_previous": bool}
    /v2/repository/models/{name}/canary        {"version", "percent"}  (none or 0: stop)
    /v2/repository/models/{name}/shadow        {"version", "tolerance"}  (no version: stop)

They are off unless the server has a management key (``rtinfer serve --management-key``
or ``RTINFER_MANAGEMENT_KEY``): then each needs ``Authorization: Bearer <management
key>``, and the inference API key does not open them. Off, they answer 404.

The same module holds the client, ``rtinfer models list|load|unload|promote|canary|
shadow``, which speaks to these routes with the standard library's ``urllib``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

import msgspec

from ..exceptions import ConfigError, ModelLoadError
from ..repository import ModelManager, UpdateRefused
from ..serving import ModelNotFound
from .auth import BearerAuth
from .control import ControlMember, Update
from .errors import HttpError

__all__ = [
    "ENV_MANAGEMENT_KEY",
    "MANAGEMENT_ROUTES",
    "Management",
    "add_models_arguments",
    "match_management",
    "models_command",
]

ENV_MANAGEMENT_KEY = "RTINFER_MANAGEMENT_KEY"

#: The management routes: (method, path template).
MANAGEMENT_ROUTES: tuple[tuple[str, str], ...] = (
    ("POST", "/v2/repository/index"),
    ("POST", "/v2/repository/models/{name}/load"),
    ("POST", "/v2/repository/models/{name}/unload"),
    ("POST", "/v2/repository/models/{name}/promote"),
    ("POST", "/v2/repository/models/{name}/canary"),
    ("POST", "/v2/repository/models/{name}/shadow"),
)
_ACTIONS = ("load", "unload", "promote", "canary", "shadow")


def match_management(rest: list[str]) -> tuple[str, dict[str, str]] | None:
    """The template of a path's parts after ``/v2/repository``, and its placeholders."""
    match rest:
        case ["index"]:
            return "/v2/repository/index", {}
        case ["models", name, action] if action in _ACTIONS:
            return f"/v2/repository/models/{{name}}/{action}", {"name": name}
    return None


class _Index(msgspec.Struct, forbid_unknown_fields=True):
    ready: bool = False


class _Load(msgspec.Struct, forbid_unknown_fields=True):
    version: str | None = None
    promote: bool = False


class _Unload(msgspec.Struct, forbid_unknown_fields=True):
    version: str | None = None
    force: bool = False


class _Promote(msgspec.Struct, forbid_unknown_fields=True):
    version: str
    keep_previous: bool = False


class _Canary(msgspec.Struct, forbid_unknown_fields=True):
    version: str | None = None
    percent: float = 0.0


class _Shadow(msgspec.Struct, forbid_unknown_fields=True):
    version: str | None = None
    tolerance: float = 1e-6


_BODIES: dict[str, type[msgspec.Struct]] = {
    "index": _Index,
    "load": _Load,
    "unload": _Unload,
    "promote": _Promote,
    "canary": _Canary,
    "shadow": _Shadow,
}


class Management:
    """Answers the management routes for ``manager``, behind its own key.

    With a :attr:`control` (``rtinfer serve --workers N``), an update is not applied
    here alone: the hub has every worker apply it (:mod:`rtinfer.http.control`).
    """

    def __init__(self, manager: ModelManager, key: str) -> None:
        self.manager = manager
        self.auth = BearerAuth(key)
        self.control: ControlMember | None = None

    def authorize(self, authorization: bytes | None) -> None:
        if not self.auth.allows(authorization):
            raise HttpError(
                401,
                "missing or wrong management key; send 'Authorization: Bearer <management "
                "key>' (the inference API key does not open these routes)",
                headers={"www-authenticate": "Bearer"},
            )

    async def handle(self, route: str, params: dict[str, str], body: bytes) -> tuple[int, Any]:
        """The status and JSON answer of one management request (already authorized)."""
        action = route.rsplit("/", 1)[-1]
        request = _decode(action, body)
        manager = self.manager
        name = params.get("name", "")
        if isinstance(request, _Index):
            entries = await manager.index()
            if request.ready:
                entries = [e for e in entries if e["state"] == "READY"]
            return 200, entries
        if self.control is None:
            await self._apply(name, request)
        else:
            await self.control.ask(Update(action, name, body))
        versions = [e for e in await manager.index() if e["name"] == name]
        return 200, {"name": name, "versions": versions}

    async def apply(self, action: str, name: str, body: bytes) -> None:
        """Apply one update (a route's action and JSON body) here: what the hub has each
        worker do. Raises :class:`HttpError` as the route would answer."""
        await self._apply(name, _decode(action, body))

    async def _apply(self, name: str, request: msgspec.Struct) -> None:
        manager = self.manager
        try:
            if isinstance(request, _Load):
                await manager.load(name, request.version, promote=request.promote)
            elif isinstance(request, _Unload):
                await manager.unload(name, request.version, force=request.force)
            elif isinstance(request, _Promote):
                await manager.promote(name, request.version, keep_previous=request.keep_previous)
            elif isinstance(request, _Canary):
                manager.canary(name, request.version, request.percent)
            elif isinstance(request, _Shadow):
                manager.shadow(name, request.version, tolerance=request.tolerance)
        except ModelNotFound as exc:
            raise HttpError(404, str(exc)) from None
        except UpdateRefused as exc:
            raise HttpError(409, str(exc)) from None
        except (ConfigError, ModelLoadError) as exc:
            raise HttpError(422, f"the repository's files could not be loaded: {exc}") from None
        except ValueError as exc:
            raise HttpError(400, str(exc)) from None


def _decode(action: str, body: bytes) -> msgspec.Struct:
    kind = _BODIES[action]
    if not body.strip():
        body = b"{}"
    try:
        return msgspec.json.decode(body, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        fields = ", ".join(f for f in kind.__struct_fields__)
        raise HttpError(
            400, f"bad {action} body: {exc}; it takes a JSON object of {fields}"
        ) from None


# -- the client: rtinfer models ... ------------------------------------------------------


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``rtinfer models`` sub-commands, for the CLI's sub-parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default="http://127.0.0.1:8000", help="the server; default http://127.0.0.1:8000"
    )
    common.add_argument("--key", help=f"the management key (default: ${ENV_MANAGEMENT_KEY})")
    common.add_argument("--timeout-s", type=float, default=60.0, help="default 60")
    actions = parser.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    actions.add_parser("list", parents=[common], help="every version and its state")
    load = actions.add_parser("load", parents=[common], help="load and warm up a version")
    load.add_argument("name")
    load.add_argument("version", nargs="?", help="default: the highest in the repository")
    load.add_argument("--promote", action="store_true", help="promote it once warmed up")
    unload = actions.add_parser("unload", parents=[common], help="drain and unload a version")
    unload.add_argument("name")
    unload.add_argument("version", nargs="?", help="default: every version (needs --force)")
    unload.add_argument("--force", action="store_true", help="also the default version")
    promote = actions.add_parser("promote", parents=[common], help="make a version the default")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument(
        "--keep-previous", action="store_true", help="keep the previous default loaded"
    )
    canary = actions.add_parser("canary", parents=[common], help="send a share to a version")
    canary.add_argument("name")
    canary.add_argument("version", nargs="?", help="omit (or give percent 0) to stop")
    canary.add_argument("percent", nargs="?", type=float, default=0.0)
    shadow = actions.add_parser("shadow", parents=[common], help="copy traffic to a version")
    shadow.add_argument("name")
    shadow.add_argument("version", nargs="?", help="omit to stop the shadow")
    shadow.add_argument("--tolerance", type=float, default=1e-6, help="default 1e-6")


def models_command(args: argparse.Namespace) -> int:
    """Run ``rtinfer models ...``: print the server's JSON answer; 0, or 1 on an error."""
    action = args.models_command
    if action == "list":
        path, body = "/v2/repository/index", {}
    else:
        path = f"/v2/repository/models/{args.name}/{action}"
        body = {"version": args.version}
        if action == "load":
            body["promote"] = args.promote
        elif action == "unload":
            body["force"] = args.force
        elif action == "promote":
            body["keep_previous"] = args.keep_previous
        elif action == "canary":
            body["percent"] = args.percent
        elif action == "shadow":
            body["tolerance"] = args.tolerance
    key = args.key or os.environ.get(ENV_MANAGEMENT_KEY)
    status, answer = _post(args.url, path, body, key, args.timeout_s)
    if status >= 400:
        message = answer.get("error") if isinstance(answer, dict) else answer
        print(f"error: {status}: {message}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    return 0


def _post(
    url: str, path: str, body: dict[str, Any], key: str | None, timeout_s: float
) -> tuple[int, Any]:
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--url must start with http:// or https://, got {url!r}")
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(  # noqa: S310  # the scheme is checked above
        url.rstrip("/") + path, data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode("utf-8", "replace")
    except urllib.error.URLError as exc:
        raise OSError(f"cannot reach {url}: {exc.reason}") from None
