"""The gas guards and refund rules, kept from hurting honest payers (a review of the fourth round's
fixes), each against the real parts: a private anvil behind a JSON-RPC proxy that can rate-limit a
call or hold back receipts, in-process gateways, the sample upstreams.

1. A node that cannot run the claim simulation now (a rate limit) does not mark an honest channel
   unclaimable: only a revert does.
2. A SOAP upstream refusing the owner's credentials (a Client fault in SOAP 1.1) is refunded, not
   charged to the caller.
3. A payer's settlement already mined, whose receipt is still on its way, is not counted twice
   against its balance (once spent, once in flight).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.ops.serving import ThreadServer
from settlement.schemes.channels_contract import ESCROW_ADDRESS, SEL_MULTICALL
from tests.conftest import PAY_TO, Devchain, GatewayFactory, demo_catalog, running_devchain
from tests.e2e.conftest import warehouse_catalog
from tests.e2e.test_attacks_channels import _client
from tests.e2e.test_attacks_gas import UPFRONT_PRICE, fresh_payer, pay_header
from tests.e2e.test_channel_paid_calls import PRICE, channel_gateway, pay_calls, upstream_calls
from tests.e2e.test_exactly_once import UPFRONT_TOOL, wait_for
from tests.e2e.test_paid_call import pay, receipt_of

pytestmark = pytest.mark.e2e

NETWORK = "eip155:31337"


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    """A private anvil for this module."""
    with running_devchain(tmp_path_factory.mktemp("review-regressions")) as private:
        yield private


class RpcProxy:
    """A JSON-RPC proxy in front of anvil that answers the calls ``failing`` picks with a JSON-RPC error
    object, as a provider does when it rate-limits (Infura/Alchemy: HTTP 200, ``{"error": {"code": -32005,
    ...}}``) or a load-balanced node lags ("header not found"): transient, nothing to do with the call."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.failing: Callable[[dict[str, Any]], bool] = lambda call: False
        self.failed = 0
        self.receipts_lag = False  # the node has mined our transactions but not indexed their receipts yet
        self.sent = 0
        self.sent_event: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

        async def endpoint(request: Request) -> JSONResponse:
            body = await request.json()
            calls = body if isinstance(body, list) else [body]
            answers = []
            async with httpx.AsyncClient(timeout=30) as http:
                for call in calls:
                    if self.receipts_lag and call.get("method") in ("eth_getTransactionReceipt", "eth_getBlockReceipts"):
                        answers.append({"jsonrpc": "2.0", "id": call.get("id"), "result": None})
                    elif self.failing(call):
                        with self._lock:
                            self.failed += 1
                        answers.append({"jsonrpc": "2.0", "id": call.get("id"),
                                        "error": {"code": -32005, "message": "request rate exceeded, retry later"}})
                    else:
                        answers.append((await http.post(self.target, json=call)).json())
                        if call.get("method") == "eth_sendRawTransaction":
                            with self._lock:
                                self.sent += 1
                                event = self.sent_event.get(self.sent)
                            if event is not None:
                                event.set()
            return JSONResponse(answers if isinstance(body, list) else answers[0])

        self.app = Starlette(routes=[Route("/", endpoint, methods=["POST"])])


@pytest.fixture
def rpc_proxy(chain: Devchain) -> Iterator[tuple[RpcProxy, str]]:
    proxy = RpcProxy(chain.anvil.rpc_url)
    with ThreadServer(proxy.app) as server:
        yield proxy, server.url


def _claim_simulation(call: dict[str, Any]) -> bool:
    """The claimer's simulation of its claim: an eth_call of the escrow's multicall from our account."""
    if call.get("method") != "eth_call":
        return False
    tx = call["params"][0]
    return (str(tx.get("to", "")).lower() == ESCROW_ADDRESS.lower() and "from" in tx
            and str(tx.get("data", "")).startswith("0x" + SEL_MULTICALL.hex()))


# -- 1. a transient RPC error marks an honest channel unclaimable, for ever ------------------------------


def test_a_transient_rpc_error_during_the_claim_simulation_does_not_lock_an_honest_channel_for_ever(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path,
    rpc_proxy: tuple[RpcProxy, str],
) -> None:
    """``Claimer._would_land`` (settlement/schemes/channels_claims.py) takes *any* ``RpcError`` from the
    simulation's eth_call as "this claim would revert": but ``RpcError`` is any JSON-RPC error object
    (settlement/chain/rpc.py ``_post``), and providers answer a rate limit (-32005), a lagging
    load-balanced node ("header not found"), a timeout (-32002) that way. One such answer during a claim
    round and every channel in it is marked ``unclaimable`` in the store (``_update_record``), a mark
    nothing ever clears: ``ChannelsEvm.charged`` then refuses every further call *and* the payer's
    cooperative refund, although its claim would land. A griefer can cause it at will: junk payments
    that pass the offline checks cost it nothing and each makes the gateway read the chain, pushing
    its provider into rate limiting while a claim round runs. Here an honest payer buys 2 calls, its
    3rd call's claim round meets one rate-limited answer per simulation, the provider recovers, and the
    honest payer's 4th call is refused (402). Correct: only a revert (``execution reverted``, JSON-RPC
    code 3) marks a channel; any other error is "unknown" (as ``ChainUnavailable`` is: the channel stays
    in, or the round is skipped), and the 4th call is served."""
    proxy, url = rpc_proxy
    gateway = channel_gateway(start_gateway, chain, upstream, tmp_path, deployment_file=chain.deployment_file,
                              rpc_urls={NETWORK: url},
                              channel_claim_every_calls=3, channel_claim_every_seconds=600)
    honest = fresh_payer(chain, 100 * PRICE)
    client = _client(chain, honest, "0x" + "f1" * 32, 20 * PRICE)

    async def scenario() -> list[int]:
        statuses = await pay_calls(gateway.url, client, 2)
        proxy.failing = _claim_simulation  # the provider rate-limits for a moment
        statuses += await pay_calls(gateway.url, client, 1)  # the 3rd voucher claims, in the request
        proxy.failing = lambda call: False  # ... and recovers
        statuses += await pay_calls(gateway.url, client, 1)
        return statuses

    statuses = asyncio.run(scenario())
    assert proxy.failed >= 1, "the claim round did not simulate through the proxy"
    assert statuses[:3] == [200] * 3
    assert statuses[3] == 200, (
        f"the honest payer {Account.from_key(honest).address}'s channel was marked unclaimable by "
        f"{proxy.failed} rate-limited simulation answer(s): its next call got {statuses[3]} "
        f"(upstream calls {upstream_calls(upstream)}), and it will never take a call again")


# -- 2. an owner's wrong SOAP credentials are charged to the caller --------------------------------------


def test_a_soap_upstream_refusing_the_owners_credentials_is_refunded_not_charged_to_the_caller(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, upstream: str, warehouse: str,
    bridge_secrets: dict[str, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``refunds.callers_failure`` (gateway/pipeline/refunds.py) counts any SOAP ``Client``/``Sender``
    fault as the caller's, whatever it says. But SOAP 1.1 puts authentication failures in the Client
    class, and so does the sample warehouse (gateway/devkit/samples/soap_warehouse.py: "authentication
    failed: missing or wrong token", a Client fault in HTTP 500): the token is the *owner's*
    (``auth: value_env: WAREHOUSE_TOKEN``), sent by the gateway, nothing the caller chose. The REST twin
    (a 401/403 with the owner's credentials) was fixed in 45b80b1 and is refunded; an upfront SOAP tool
    with a wrong or rotated owner token keeps every caller's money, answers a 502 fault with
    ``refund: none``, and stores it so a resend replays the same charged failure. Correct: a fault about
    credentials the gateway sends (or any Client fault on a tool that does not send the caller's own
    credential, unless the owner says otherwise) is the owner's failure: refunded, as the 401 is."""
    monkeypatch.setenv("WAREHOUSE_TOKEN", "rotated-by-the-owner-and-not-updated")
    catalog = warehouse_catalog(tmp_path, upstream, warehouse,
                                replace={'price: "0.002"\n    kind: soap': 'price: "0.002"\n    settle: upfront\n    kind: soap'})
    gateway = start_gateway(catalog, refund_key=devchain.key(9))
    payer = devchain.address(4)
    before = devchain.balance(payer)
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/warehouse/stock/BLT-100?warehouse=LIS", payer=4)
    assert receipt_of(paid).success, paid.text  # settled first: upfront
    body = paid.json()
    assert paid.status_code == 502 and "authentication failed" in paid.text, paid.text
    assert body.get("refund") != "none" and devchain.balance(payer) == before, (
        f"the caller paid for the owner's wrong credentials: {paid.status_code} {body.get('error')} "
        f"refund={body.get('refund')!r}, payer balance {devchain.balance(payer) - before:+d}")


# -- 3. verify counts a payer's mined settlements twice -------------------------------------------------


def test_verify_does_not_count_a_settlement_already_mined_twice_against_an_honest_payer(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path,
    rpc_proxy: tuple[RpcProxy, str],
) -> None:
    """``LocalFacilitator.verify`` (settlement/schemes/exact_local.py) refuses when ``balance < value +
    in_flight.taken(...)``, and ``InFlight.hold`` (settlement/schemes/exact_guards.py) when ``balance <
    others + value``; but a settlement stays "in flight" until this process has *read its receipt*,
    while the balance read already shows it mined. Every settlement mined and not yet acknowledged is
    subtracted twice: up to twice what the payer owes is required, not "a payer whose balance is exactly
    spent" as the module says. Here an honest agent holds 4 prices and has 2 upfront calls settling
    (both mined, their receipts not indexed yet by the node, a usual lag, or simply the receipt
    poller's interval): its 3rd call (it has 2 prices left, the call costs 1) is refused 402
    ``insufficient_balance`` (before the guard, it was served). Correct: only settlements not yet
    reflected in the balance read count against it, e.g. read each held authorization's
    ``authorizationState`` in the same JSON-RPC batch (same block) as the balance and leave out the
    ones already used; the 3rd call is served."""
    proxy, url = rpc_proxy
    catalog = demo_catalog(tmp_path, upstream)
    catalog.write_text(catalog.read_text() + UPFRONT_TOOL)
    gateway = start_gateway(catalog=catalog, deployment_file=chain.deployment_file, rpc_urls={NETWORK: url},
                            receipt_timeout_seconds=60)
    payer = fresh_payer(chain, 4 * UPFRONT_PRICE)
    address = Account.from_key(payer).address
    paths = [f"/paid-first/reports/{n}" for n in (21, 22, 23)]
    with gateway.client() as client:
        headers = [pay_header(client, payer, path) for path in paths]
    two_sent = proxy.sent_event.setdefault(proxy.sent + 2, threading.Event())
    three_sent = proxy.sent_event.setdefault(proxy.sent + 3, threading.Event())
    proxy.receipts_lag = True

    def call(i: int) -> httpx.Response:
        return httpx.get(f"{gateway.url}{paths[i]}", headers={"PAYMENT-SIGNATURE": headers[i]}, timeout=90)

    with ThreadPoolExecutor(3) as pool:
        first = [pool.submit(call, i) for i in (0, 1)]
        assert two_sent.wait(30), "the two settlements were not broadcast"
        assert chain.balance(address) == 2 * UPFRONT_PRICE  # both mined: 2 prices left
        later = pool.submit(call, 2)
        wait_for(lambda: later.done() or three_sent.is_set(), "the third call refused or broadcast")
        proxy.receipts_lag = False  # the receipts come in: every call that was broadcast is answered
        third = later.result(90)
        answers = [f.result(90) for f in first]
    assert [a.status_code for a in answers] == [200, 200], [a.text[:200] for a in answers]
    assert third.status_code == 200, (
        f"an honest payer with {chain.balance(address)} left (2 prices) was refused a 1-price call: "
        f"{third.status_code} {third.text[:300]}; its 2 mined settlements were counted twice (balance and in flight)")
    assert chain.balance(PAY_TO) > 0
