"""Helpers shared by the settlement tests that drive the chain client and the ledger directly."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from gateway.devkit.devchain import ANVIL_KEYS, LOCAL_NETWORK
from settlement.x402.wire import PaymentRequirements
from tests.conftest import PAY_TO, Devchain

PRICE = 1000
SETTLEMENT_KEY = ANVIL_KEYS[0]


def requirements(devchain: Devchain) -> PaymentRequirements:
    return PaymentRequirements(
        scheme="exact", network=LOCAL_NETWORK, amount=str(PRICE), asset=devchain.token, pay_to=PAY_TO,
        max_timeout_seconds=120, extra={"name": "USD Coin", "version": "2"},
    )


def settlement_nonce(devchain: Devchain, tag: str) -> int:
    """The settlement account's transaction count at ``tag`` ("latest" or "pending")."""
    address = devchain.w3.eth.account.from_key(SETTLEMENT_KEY).address
    return int(devchain.w3.eth.get_transaction_count(address, tag))


def anvil_rpc(devchain: Devchain, method: str, *params: Any) -> Any:
    return devchain.w3.provider.make_request(method, list(params))  # type: ignore[arg-type]


def ledger_fields(i: int, **extra: Any) -> dict[str, Any]:
    """The fields of a verified payment row, distinct per ``i``."""
    return {
        "request_id": f"req-{i}", "owner": "acme", "tool": "quote", "decimals": 6, "method": "GET", "path": "/q",
        "payer": "0x" + "1" * 40, "pay_to": "0x" + "2" * 40, "amount": 1000 + i, "network": "eip155:31337",
        "asset": "0x" + "3" * 40, "nonce": f"0x{i:064x}", "valid_before": 1, "authorization": "{}",
        "payment_identifier": None, "fingerprint": "f", "settle_mode": "after", **extra,
    }


@contextmanager
def tcp_front(serve_connection: Callable[[socket.socket], None]) -> Iterator[str]:
    """A loopback TCP server handing each accepted connection to ``serve_connection`` on a thread of
    its own (test fronts to anvil that drop or hold what they are told to); yields its http URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve_connection, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()
        thread.join()
