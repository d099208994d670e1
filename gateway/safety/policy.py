"""Controls an operator changes while the gateway runs: payer allow/deny lists and kill switches
per tool and per owner. No restart is needed for any of them.

Two sources, merged on every request:

* a policy file (``X402GW_POLICY_FILE``, YAML or JSON), re-read when its mtime, size or inode
  changes; a file that does not parse is logged and the last good version stays in force::

      deny_payers: ["0xabc...", ...]          # refused with 403 payer_denied
      allow_payers: ["0xdef...", ...]         # when present, every other payer is refused
      disabled_tools: {get_quote: "upstream migration"}   # or a list of names
      disabled_owners: [acme-legacy]

* overrides in the state store, set through ``POST /admin/kill-switch`` and ``POST /admin/payers``
  (bearer ``X402GW_ADMIN_TOKEN``), so every replica sharing the store sees a change at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from eth_utils import is_address
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import codes
from gateway.errors import GatewayError
from gateway.headers import AUTHORIZATION, WWW_AUTHENTICATE, lower
from gateway.store import StateStore, StoreUnavailable

__all__ = ["OVERRIDES_KEY", "Policy", "PolicyView", "parse_policy", "policy_routes"]

log = logging.getLogger("x402gw.policy")

OVERRIDES_KEY = "policy:overrides"
_LOCK_KEY = "policy:lock"


@dataclass(frozen=True)
class PolicyView:
    """The policy in force for one request. Payer addresses are lower-case."""

    disabled_tools: dict[str, str] = field(default_factory=dict)
    disabled_owners: dict[str, str] = field(default_factory=dict)
    denied_payers: dict[str, str] = field(default_factory=dict)
    allowed_payers: frozenset[str] | None = None  # None: everyone not denied

    def tool_disabled(self, tool: str, owner: str) -> str | None:
        """The reason the tool is switched off, or None."""
        if tool in self.disabled_tools:
            return self.disabled_tools[tool] or "the tool is switched off by the operator"
        if owner in self.disabled_owners:
            return self.disabled_owners[owner] or "the owner's tools are switched off by the operator"
        return None

    def payer_refused(self, payer: str) -> str | None:
        key = payer.lower()
        if key in self.denied_payers:
            return self.denied_payers[key] or "this payer is on the deny list"
        if self.allowed_payers is not None and key not in self.allowed_payers:
            return "this gateway serves listed payers only"
        return None


def _names(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return {v: "" for v in value}
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, (str, type(None))) for k, v in value.items()):
        return {k: v or "" for k, v in value.items()}
    raise ValueError(f"{what} must be a list of names or a mapping of name to reason")


def _payers(value: Any, what: str) -> dict[str, str]:
    names = _names(value, what)
    bad = [n for n in names if not is_address(n)]
    if bad:
        raise ValueError(f"{what}: not addresses: {', '.join(bad[:5])}")
    return {n.lower(): reason for n, reason in names.items()}


_FILE_KEYS = {"deny_payers", "allow_payers", "disabled_tools", "disabled_owners"}


def parse_policy(text: str) -> PolicyView:
    """A policy file's text (YAML, of which JSON is a subset) → PolicyView; ValueError if invalid."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML/JSON: {exc}") from None
    if data is None:
        return PolicyView()
    if not isinstance(data, dict):
        raise ValueError("the policy must be a mapping")
    unknown = set(data) - _FILE_KEYS
    if unknown:
        raise ValueError(f"unknown keys: {', '.join(sorted(map(str, unknown)))}")
    allowed = data.get("allow_payers")
    return PolicyView(
        disabled_tools=_names(data.get("disabled_tools"), "disabled_tools"),
        disabled_owners=_names(data.get("disabled_owners"), "disabled_owners"),
        denied_payers=_payers(data.get("deny_payers"), "deny_payers"),
        allowed_payers=None if allowed is None else frozenset(_payers(allowed, "allow_payers")),
    )


class _PolicyFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self.view = PolicyView()

    def current(self) -> PolicyView:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._stamp != (0, 0, 0):
                log.warning("policy file %s is missing: no file policy in force", self.path)
                self._stamp, self.view = (0, 0, 0), PolicyView()
            return self.view
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self.view = parse_policy(self.path.read_text(encoding="utf-8"))
                log.info("policy file %s loaded", self.path)
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                log.error("policy file %s is invalid, keeping the previous policy: %s", self.path, exc)
        return self.view


def _overrides(raw: bytes | None) -> dict[str, dict[str, Any]]:
    data = json.loads(raw) if raw else {}
    return {kind: dict(data.get(kind) or {}) for kind in ("tools", "owners", "payers")}


class Policy:
    def __init__(self, store: StateStore, policy_file: Path | None = None) -> None:
        self.store = store
        self._file = _PolicyFile(policy_file) if policy_file is not None else None

    async def overrides(self) -> dict[str, dict[str, Any]]:
        return _overrides(await self.store.get(OVERRIDES_KEY))

    async def current(self) -> PolicyView:
        try:
            raw = await self.store.get(OVERRIDES_KEY)
        except StoreUnavailable:
            raise GatewayError(codes.STORE_UNAVAILABLE, "the gateway's shared state is unavailable; retry later",
                               status=503, retryAfter=2) from None
        return self.view_from(raw)

    def view_from(self, raw: bytes | None) -> PolicyView:
        """The policy in force, given the stored overrides (``OVERRIDES_KEY``'s value, read by the caller)."""
        base = self._file.current() if self._file is not None else PolicyView()
        extra = _overrides(raw)
        if not any(extra.values()):
            return base
        return PolicyView(
            disabled_tools={**base.disabled_tools, **{k: v["reason"] for k, v in extra["tools"].items()}},
            disabled_owners={**base.disabled_owners, **{k: v["reason"] for k, v in extra["owners"].items()}},
            denied_payers={**base.denied_payers, **{k: v["reason"] for k, v in extra["payers"].items()}},
            allowed_payers=base.allowed_payers,
        )

    async def set(self, kind: str, name: str, on: bool, reason: str = "") -> dict[str, dict[str, Any]]:
        """Switch a tool/owner off (``on``) or back on, or deny/undeny a payer; returns the overrides.
        A read-modify-write under a store lock, so concurrent admins on several replicas do not
        lose each other's changes."""
        assert kind in ("tools", "owners", "payers")
        owner = uuid.uuid4().hex
        for _ in range(100):
            if await self.store.acquire(_LOCK_KEY, owner, 5000):
                break
            await asyncio.sleep(0.02)  # another admin change is being written; it takes a moment
        else:
            raise GatewayError(codes.STORE_BUSY, "another policy change is in progress; retry", status=503, retryAfter=1)
        try:
            data = await self.overrides()
            entries = data[kind]
            key = name.lower() if kind == "payers" else name
            if on:
                entries[key] = {"reason": reason, "at": datetime.now(UTC).isoformat(timespec="seconds")}
            else:
                entries.pop(key, None)
            await self.store.put(OVERRIDES_KEY, json.dumps(data, separators=(",", ":")).encode())
            return data
        finally:
            await self.store.release(_LOCK_KEY, owner)


# -- admin endpoints ---------------------------------------------------------------------------


def policy_routes(policy: Policy, token: str, tools: Iterable[str], owners: Iterable[str]) -> list[Route]:
    """``POST /admin/kill-switch`` {"tool"|"owner": name, "disabled": bool, "reason": str},
    ``POST /admin/payers`` {"payer": address, "denied": bool, "reason": str},
    ``GET /admin/kill-switch``: the policy in force. All need ``Authorization: Bearer <token>``.

    Longer than 60 lines on purpose: the handlers are small closures over one token and one set of
    known names, kept together so the admin surface of the policy reads as one unit."""
    known = {"tools": frozenset(tools), "owners": frozenset(owners)}
    expected = f"Bearer {token}".encode()

    def authorised(request: Request) -> bool:
        return hmac.compare_digest(request.headers.get(lower(AUTHORIZATION), "").encode(), expected)

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            data = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise GatewayError(codes.INVALID_JSON_BODY, "the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise GatewayError(codes.INVALID_JSON_BODY, "the request body must be a JSON object")
        return data

    def reason_of(data: dict[str, Any]) -> str:
        reason = data.get("reason", "")
        if not isinstance(reason, str) or len(reason) > 500:
            raise GatewayError(codes.INVALID_ARGUMENTS, "reason must be a string of at most 500 characters")
        return reason

    async def guarded(request: Request, handler: Callable[[Request], Awaitable[Response]]) -> Response:
        if not authorised(request):
            return GatewayError(codes.ADMIN_UNAUTHORIZED, "the admin token is missing or wrong", status=401,
                                headers={WWW_AUTHENTICATE: 'Bearer realm="x402gw-admin"'}).to_response()
        try:
            return await handler(request)
        except GatewayError as err:
            return err.to_response()
        except StoreUnavailable:
            return GatewayError(codes.STORE_UNAVAILABLE, "the shared state is unavailable; retry later",
                                status=503, retryAfter=2).to_response()

    async def kill_switch(request: Request) -> Response:
        if request.method == "GET":
            view = await policy.current()
            return JSONResponse({
                "disabledTools": view.disabled_tools, "disabledOwners": view.disabled_owners,
                "deniedPayers": view.denied_payers,
                "allowedPayers": None if view.allowed_payers is None else sorted(view.allowed_payers),
            })
        data = await body_of(request)
        kinds = [k for k in ("tool", "owner") if k in data]
        if len(kinds) != 1 or not isinstance(data[kinds[0]], str) or not isinstance(data.get("disabled"), bool):
            raise GatewayError(codes.INVALID_ARGUMENTS, 'send {"tool": name} or {"owner": name} and "disabled": true|false')
        kind = kinds[0] + "s"
        name = data[kinds[0]]
        if name not in known[kind]:
            raise GatewayError(codes.NOT_FOUND, f"no {kinds[0]} named {name!r} in the catalog", status=404)
        overrides = await policy.set(kind, name, data["disabled"], reason_of(data))
        log.warning("kill switch: %s %s %s", kinds[0], name, "disabled" if data["disabled"] else "enabled")
        return JSONResponse({"ok": True, "overrides": overrides})

    async def payers(request: Request) -> Response:
        data = await body_of(request)
        payer = data.get("payer")
        if not isinstance(payer, str) or not is_address(payer) or not isinstance(data.get("denied"), bool):
            raise GatewayError(codes.INVALID_ARGUMENTS, 'send {"payer": "0x...", "denied": true|false}')
        overrides = await policy.set("payers", payer, data["denied"], reason_of(data))
        log.warning("payer %s %s", payer, "denied" if data["denied"] else "no longer denied")
        return JSONResponse({"ok": True, "overrides": overrides})

    async def kill_switch_route(request: Request) -> Response:
        return await guarded(request, kill_switch)

    async def payers_route(request: Request) -> Response:
        return await guarded(request, payers)

    return [
        Route("/admin/kill-switch", kill_switch_route, methods=["GET", "POST"]),
        Route("/admin/payers", payers_route, methods=["POST"]),
    ]
