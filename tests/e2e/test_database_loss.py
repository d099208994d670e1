"""The ledger's PostgreSQL drops every connection while a paid call waits for its settlement to be
mined (the gateway pings only idle pooled connections, so this call may meet a dead one). Whatever
the call answers, money moves once: no 402 for a broadcast payment, no content without a settled
row, the same payment sent again is served from the stored answer, the upstream is called once and
the ledger equals the chain. Real anvil (manual mining), PostgreSQL and a gateway process."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg

from settlement.ledger import PaymentState
from settlement.schema import open_ledger
from tests.conftest import PAY_TO, PG_ADMIN_URL, Devchain, demo_catalog, upstream_hits
from tests.e2e.test_exactly_once import (
    PRICE,
    assert_ledger_matches_chain,
    process_env,
    raw_request,
    row_for,
    signed,
    wait_for,
)
from tests.e2e.test_exactly_once import chain as chain  # its private anvil (manual mining)
from tests.e2e.test_workers import database as database  # a database of the test's own: all its connections are killed
from tests.support.processes import gateway_processes


def kill_connections(database_url: str) -> int:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s",
            (database_url.rsplit("/", 1)[1],),
        ).fetchone()
    return int(row[0]) if row else 0


def read_answer(sock: socket.socket) -> tuple[int, bytes]:
    """The status and body of the answer on a ``Connection: close`` socket (``raw_request``)."""
    sock.settimeout(60)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_database_connections_lost_mid_settlement_move_money_once(
    chain: Devchain, upstream: str, tmp_path: Path, database: str, manual_mining: Callable[[], None],
) -> None:
    env = process_env(chain, demo_catalog(tmp_path, upstream), database, X402GW_RECEIPT_TIMEOUT_SECONDS="60")
    before = chain.balance(PAY_TO)
    with gateway_processes([env], tmp_path) as [gateway]:
        ledger = open_ledger(database)
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            header = signed(client, chain, "/quotes/LOSS")
        sock = raw_request(gateway.port, "/quotes/LOSS", header)
        wait_for(lambda: row_for(ledger, lambda r: r.tx_hash is not None), "the settlement broadcast")
        ledger.close()
        assert kill_connections(database) >= 1  # the gateway's pool, while its call waits for a block
        manual_mining()
        status, body = read_answer(sock)
        if status != 200:  # the call met a dead connection: closed, and never a price to pay again
            assert status == 503, body
            assert json.loads(body)["error"] == "ledger_unavailable"
        resend = httpx.get(f"{gateway.url}/quotes/LOSS", headers={"PAYMENT-SIGNATURE": header}, timeout=30)
        assert resend.status_code == 200, resend.text
        assert resend.json()["symbol"] == "LOSS" and resend.headers["x402gw-replay"] == "true"
    ledger = open_ledger(database)
    [row] = ledger.all()
    assert row.state == PaymentState.SETTLED
    assert chain.balance(PAY_TO) - before == PRICE
    assert upstream_hits(upstream, "GET /api/v1/quote/LOSS") == 1
    assert_ledger_matches_chain(ledger, chain, before)
    ledger.close()
