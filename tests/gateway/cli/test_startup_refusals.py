"""What the app refuses once the server has started (its lifespan: chains, tokens, facilitators,
store, BatchSettlers) ends ``x402gw serve`` as a refusal before it does: one ``error: ... [code]``
line on standard error, exit status 2 (which stops a ``--workers`` supervisor), no traceback."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.cli.startup import RefusesAtStartUp, refusal_line
from gateway.devkit.devchain import ANVIL_ADDRESSES, LOCAL_NETWORK, deploy_batch_settler
from gateway.errors import GatewayConfigError
from settlement.errors import LedgerError
from tests.conftest import Devchain, demo_catalog
from tests.gateway.cli.test_serve_settings import KEY, LIVE, SECRET, serve


def assert_refused(status: int, output: str, code: str) -> str:
    assert status == 2, output
    assert "Traceback" not in output and "Application startup failed" not in output, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: ") and last.endswith(f"[{code}]"), output
    return last


def test_an_unreachable_chain_is_one_line_and_status_2(tmp_path: Path) -> None:
    last = assert_refused(*serve(tmp_path, **LIVE, X402GW_SETTLEMENT_KEY=KEY), "chain_unreachable")
    assert "eip155:84532" in last and KEY[2:] not in last


def test_a_batch_settler_of_another_account_is_refused_before_serving(tmp_path: Path, devchain: Devchain) -> None:
    contract = deploy_batch_settler(devchain.anvil.rpc_url, ANVIL_ADDRESSES[3])
    status, output = serve(
        tmp_path, X402GW_CATALOG=str(demo_catalog(tmp_path, "http://127.0.0.1:9")),
        X402GW_DEPLOYMENT_FILE=str(devchain.deployment_file),
        X402GW_BATCH_SETTLEMENT=json.dumps({LOCAL_NETWORK: {"contract": contract}}),
    )
    last = assert_refused(status, output, "batch_settler_not_ours")
    assert contract in last and ANVIL_ADDRESSES[3] in last


class Exited(Exception):
    pass


def lifespan_of(app: Any) -> tuple[list[dict[str, Any]], list[int]]:
    """Run ``app``'s lifespan start-up through RefusesAtStartUp: the messages uvicorn would get, and the exit asked for."""
    sent: list[dict[str, Any]] = []
    exits: list[int] = []

    def exit_with(status: int) -> None:
        exits.append(status)
        raise Exited

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def go() -> None:
        try:
            await RefusesAtStartUp(app, exit_with)({"type": "lifespan"}, receive, send)
        except Exited:
            pass

    asyncio.run(go())
    return sent, exits


def failing(exc: Exception) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "Traceback (most recent call last): ..."})
        raise exc

    return app


def test_a_refusal_in_the_lifespan_exits_2_and_uvicorn_never_sees_its_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    sent, exits = lifespan_of(failing(GatewayConfigError("the state store (Redis) is not reachable", code="store_unavailable")))
    assert exits == [2] and sent == []
    assert capsys.readouterr().err.strip() == "error: the state store (Redis) is not reachable [store_unavailable]"


def test_an_unexpected_failure_is_one_line_without_its_text(capsys: pytest.CaptureFixture[str]) -> None:
    sent, exits = lifespan_of(failing(RuntimeError(f"postgresql://admin:{SECRET}@db/ledger refused")))
    assert exits == [2] and sent == []
    err = capsys.readouterr().err.strip()
    assert err.endswith("[startup_failed]") and SECRET not in err and "RuntimeError" in err
    assert refusal_line(LedgerError("down")).endswith("[ledger_unavailable]")


def test_a_started_app_and_other_scopes_pass_through() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})

    sent, exits = lifespan_of(app)
    assert sent == [{"type": "lifespan.startup.complete"}] and exits == []
