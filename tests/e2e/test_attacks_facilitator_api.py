"""Attacks on the served facilitator API, found by review and fixed (the tests hold the fixes:
``SettleOnce.settle`` asks a contract wallet before anything is keyed on its (payer, nonce); an
authorization whose settlement's outcome is unknown is named in the shared store for every replica
(``InFlight.holds``, ``RedisStore.keep_held``); verify simulates a wallet's transfer through the
``bytes`` overload, ``exact_guards.transfer_refusal``). What each one was: (``gateway/surfaces/facilitator_api.py``) against a real
anvil, real Redis and PostgreSQL, and real gateways (in-process and as processes).

1. A junk signature naming a victim's (payer, nonce) is not an EOA signature of ``from``, so the
   local facilitator's ``check_offline`` takes it as an unconfirmed *contract-wallet* signature
   (contract wallets are always on: ``gateway.wiring.build_wallets``) instead of refusing it.
   ``SettleOnce`` then takes the paid path's lock ``pay:<network>:<payer>:<nonce>`` and only after
   that asks the chain (``isValidSignature`` on the victim's EOA) whether the signature holds: for
   one RPC round trip per junk request, the victim's own paid request is refused 409
   ``payment_in_flight`` and nothing is settled. The RPC round trip is held open by a gating proxy
   in front of anvil, standing in for a slow node (a real RPC's latency, the attacker's requests
   back to back).
2. Two replicas on one Redis and one ledger: replica one's paid request broadcasts its settlement
   and answers 503 ``settlement_pending`` (the block is late). Its "in flight here" record
   (``InFlight.holds``) is per process and its payment lock is released with the request, so the
   same authorization, rebuilt from the pending transaction in the pool and posted to replica two's
   ``/facilitator/settle``, verifies (the nonce is unused at ``latest``) and is broadcast a second
   time from the same settlement key: it reverts on the gateway's gas once both are mined.
3. A contract-wallet signature is confirmed by an eth_call of the wallet's ``isValidSignature``
   only (``wallets.WalletSignatures.check``); the transfer itself is simulated for ECDSA-signed
   accounts with code (``exact_guards.transfer_refusal``) but not for wallet signatures. A wallet
   that answers the magic value to a direct call and reverts when the token calls it (its code put
   in place with ``anvil_setCode``: deploying it costs the griefer one transaction, once) makes every
   ``/facilitator/settle`` of a fresh authorization a reverted transaction on the gateway's gas.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from eth_abi import decode as abi_decode
from eth_typing import ChecksumAddress
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from web3 import Web3

from catalog import load_catalogs
from gateway.app import create_app
from gateway.devkit.payer import Payer
from gateway.ops.serving import ThreadServer
from gateway.settings import Settings
from settlement.ledger import Ledger, PaymentState
from settlement.schema import open_ledger
from settlement.x402.codec import encode_header
from tests.conftest import PAY_TO, Devchain, offer_of, running_devchain
from tests.support import chain_actions
from tests.support.attack_stack import JUNK_SIGNATURE, REDIS_URL
from tests.support.processes import GatewayProcess
from tests.support.recording_upstream import RecordingUpstream

pytestmark = pytest.mark.e2e

FUNDER = 5
NETWORK = "eip155:31337"
PRICE = 2000  # "0.002" at 6 decimals
SEL_IS_VALID_SIGNATURE = "0x1626ba7e"
SEL_TRANSFER_WITH_AUTHORIZATION = "0xe3ee160e"

CATALOG = """
catalog: 1
owner: review-facilitator
payment: {{network: "{network}", asset: "{token}", asset_name: "USD Coin", asset_version: "2",
           decimals: 6, pay_to: "{pay_to}", max_timeout_seconds: 300}}
upstreams:
  default: {{base_url: "{upstream}", timeout_seconds: 20}}
tools:
  - name: review_read
    description: A paid read (settles after the upstream answers)
    method: GET
    path: /r/{{item}}
    upstream_path: /u/review_read/{{item}}
    price: "0.002"
    settle: after
"""


def wait_for(what: Callable[[], Any], label: str, seconds: float = 20.0) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {label}")
        time.sleep(0.02)


class GatedRpc:
    """A JSON-RPC proxy in front of anvil that holds back any ``isValidSignature`` eth_call made on
    ``gated`` (an address) until ``release`` is set (at most 30 s): a slow node, on demand."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.gated: str | None = None
        self.hit = threading.Event()
        self.release = threading.Event()
        self._client = httpx.Client(timeout=60)
        self.server = ThreadServer(self._app())

    def _matches(self, body: bytes) -> bool:
        if self.gated is None:
            return False
        try:
            data = json.loads(body)
        except ValueError:
            return False
        for call in data if isinstance(data, list) else [data]:
            if not isinstance(call, dict) or call.get("method") != "eth_call":
                continue
            params = call.get("params") or [{}]
            first = params[0] if isinstance(params[0], dict) else {}
            to, input_ = str(first.get("to", "")).lower(), str(first.get("data") or first.get("input") or "")
            if to == self.gated.lower() and input_.lower().startswith(SEL_IS_VALID_SIGNATURE):
                return True
        return False

    def _app(self) -> Starlette:
        def forward(body: bytes, content_type: str) -> httpx.Response:
            return self._client.post(self.target, content=body, headers={"Content-Type": content_type})

        async def proxy(request: Request) -> Response:
            body = await request.body()
            if self._matches(body):
                self.hit.set()
                deadline = time.monotonic() + 30
                while not self.release.is_set() and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
            answer = await run_in_threadpool(forward, body, request.headers.get("content-type", "application/json"))
            return Response(answer.content, status_code=answer.status_code,
                            media_type=answer.headers.get("content-type", "application/json"))

        return Starlette(routes=[Route("/", proxy, methods=["POST"])])


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    """A private anvil: one test switches automining off and on (``manual_mining``)."""
    with running_devchain(tmp_path_factory.mktemp("review-facilitator")) as private:
        yield private


@pytest.fixture(scope="module")
def review_upstream() -> Iterator[RecordingUpstream]:
    upstream = RecordingUpstream().start()
    yield upstream
    upstream.stop()


def write_catalog(directory: Path, chain: Devchain, upstream: RecordingUpstream) -> Path:
    path = directory / "review-facilitator.yaml"
    path.write_text(CATALOG.format(network=NETWORK, token=chain.token, pay_to=PAY_TO, upstream=upstream.url))
    return path


def settler(chain: Devchain) -> ChecksumAddress:
    return Web3.to_checksum_address(chain.deployment.deployer)


def sent_by_settler(chain: Devchain) -> int:
    """The settlement account's transactions, mined or waiting in the node's pool."""
    return chain.w3.eth.get_transaction_count(settler(chain), "pending")


def settler_txs(chain: Devchain, first_block: int) -> list[dict[str, Any]]:
    account = settler(chain)
    sent: list[dict[str, Any]] = []
    for number in range(first_block, chain.w3.eth.block_number + 1):
        for tx in chain.w3.eth.get_block(number, full_transactions=True)["transactions"]:
            assert not isinstance(tx, bytes)
            if tx["from"] == account:
                receipt = chain.w3.eth.get_transaction_receipt(tx["hash"])
                sent.append({"hash": tx["hash"].to_0x_hex(), "status": receipt["status"],
                             "gasUsed": receipt["gasUsed"], "nonce": tx["nonce"]})
    return sent


def facilitator_body(payload: dict[str, Any], requirements: dict[str, Any]) -> dict[str, Any]:
    return {"x402Version": 2, "paymentPayload": payload, "paymentRequirements": requirements}


def in_process_gateway(tmp_path: Path, chain: Devchain, upstream: RecordingUpstream,
                       deployment_file: Path) -> tuple[ThreadServer, Ledger]:
    """A gateway on loopback (memory store) serving the review catalog and /facilitator for its own payee."""
    settings = Settings(catalog=[write_catalog(tmp_path, chain, upstream)], deployment_file=deployment_file,
                        serve_facilitator=True, database_url=f"sqlite:///{tmp_path / 'ledger.sqlite3'}",
                        receipt_timeout_seconds=10)
    ledger = open_ledger(settings.database_url)
    return ThreadServer(create_app(settings, catalogs=load_catalogs(settings.catalog), ledger=ledger)).start(), ledger


# -- 1. a junk signature on a victim's nonce takes the victim's payment lock -------------------------


def test_a_junk_signature_naming_a_victims_nonce_does_not_lock_the_victim_out(
    chain: Devchain, review_upstream: RecordingUpstream, tmp_path: Path,
) -> None:
    rpc = GatedRpc(chain.anvil.rpc_url)
    rpc.server.start()
    deployment_file = tmp_path / "devchain-gated.json"
    chain.deployment.model_copy(update={"rpc_url": rpc.server.url}).write(deployment_file)
    server, ledger = in_process_gateway(tmp_path, chain, review_upstream, deployment_file)
    try:
        victim_key = chain_actions.fresh_payer(chain.w3, chain.token, chain.key(FUNDER), 10 * PRICE)
        victim = Payer(victim_key)
        with httpx.Client(base_url=server.url, timeout=60) as client:
            offer = offer_of(client.get("/r/1"))
        payment = victim.sign(offer.accepts[0], resource=offer.resource).to_wire()
        # The attacker copies the victim's authorization (its payer and nonce are all the lock needs)
        # and signs nothing: the signature is junk.
        junk = json.loads(json.dumps(payment))
        junk["payload"]["signature"] = JUNK_SIGNATURE
        payee_before, victim_before = chain.balance(PAY_TO), chain.balance(victim.address)
        calls_before = review_upstream.count("review_read")

        rpc.gated = victim.address
        with ThreadPoolExecutor(1) as pool:
            attack = pool.submit(httpx.post, f"{server.url}/facilitator/settle",
                                 json=facilitator_body(junk, payment["accepted"]), timeout=60)
            try:
                wait_for(rpc.hit.is_set, "the junk settle's wallet check to reach the chain")
                with httpx.Client(base_url=server.url, timeout=60) as client:
                    paid = client.get("/r/1", headers={"PAYMENT-SIGNATURE": encode_header(payment)})
            finally:
                rpc.release.set()
            refused = attack.result(timeout=60)

        rows = [r for r in ledger.all() if r.payer.lower() == victim.address.lower()]
        charged = victim_before - chain.balance(victim.address)
        detail = (f"victim's paid request {paid.status_code} {paid.text[:200]!r}; the junk settle got "
                  f"{refused.status_code} {refused.text[:200]!r}; ledger {[(r.state, r.error_reason) for r in rows]}; "
                  f"victim charged {charged}")
        # The junk is refused on its signature ...
        assert refused.json().get("success") is False, detail
        # ... and the victim's own payment, presented while the junk was being checked, is served and settled.
        assert paid.status_code == 200, detail
        assert [r.state for r in rows] == [PaymentState.SETTLED], detail
        assert charged == PRICE and chain.balance(PAY_TO) - payee_before == PRICE, detail
        assert chain.authorization_state(victim.address, payment["payload"]["authorization"]["nonce"]), detail
        assert review_upstream.count("review_read", calls_before) == 1, detail
    finally:
        rpc.release.set()
        server.stop()
        ledger.close()
        rpc.server.stop()


# -- 3. a contract wallet that accepts when asked directly and refuses when the token asks ----------

# isValidSignature: the magic value when called directly (CALLER == ORIGIN: the facilitator's
# eth_call), a revert when a contract calls it (the token, during the settlement transaction).
# CALLER ORIGIN EQ PUSH1 0x0a JUMPI PUSH1 0 DUP1 REVERT JUMPDEST PUSH4 magic PUSH1 224 SHL
# PUSH1 0 MSTORE PUSH1 32 PUSH1 0 RETURN
TWO_FACED_WALLET = "0x333214600a57600080fd5b631626ba7e60e01b60005260206000f3"


def test_a_wallet_that_says_yes_only_to_the_facilitators_check_cannot_make_it_broadcast_reverts(
    chain: Devchain, review_upstream: RecordingUpstream, tmp_path: Path,
) -> None:
    """A griefer's contract wallet holding one price answers ``isValidSignature`` with the magic
    value to the facilitator's eth_call and reverts when the token asks it on chain. Each
    ``/facilitator/settle`` of a fresh authorization from it verifies, is broadcast, and reverts on
    the gateway's gas; the griefer signs nothing real and loses nothing, round after round."""
    wallet = Web3.to_checksum_address("0x" + uuid.uuid4().hex + uuid.uuid4().hex[:8])
    chain.w3.provider.make_request("anvil_setCode", [wallet, TWO_FACED_WALLET])  # type: ignore[arg-type]
    chain_actions.transfer(chain.w3, chain.token, chain.key(FUNDER), wallet, PRICE)
    server, ledger = in_process_gateway(tmp_path, chain, review_upstream, chain.deployment_file)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            requirements = offer_of(client.get("/r/3")).accepts[0].to_wire()
        sent_before, eth_before = sent_by_settler(chain), chain.w3.eth.get_balance(settler(chain))
        first_block = chain.w3.eth.block_number + 1
        answers = []
        for _ in range(3):
            payload = {
                "x402Version": 2, "accepted": requirements,
                "payload": {
                    "signature": "0x" + "22" * 66,  # not an ECDSA signature: a claim the wallet accepts it
                    "authorization": {"from": wallet, "to": requirements["payTo"], "value": requirements["amount"],
                                      "validAfter": "0", "validBefore": str(int(time.time()) + 120),
                                      "nonce": "0x" + uuid.uuid4().hex + uuid.uuid4().hex},
                },
            }
            answers.append(httpx.post(f"{server.url}/facilitator/settle",
                                      json=facilitator_body(payload, requirements), timeout=60).json())
        sent = settler_txs(chain, first_block)
        detail = (f"/facilitator/settle answered {[(a.get('success'), a.get('errorReason')) for a in answers]}; "
                  f"the settlement key sent {sent_by_settler(chain) - sent_before} transaction(s): {sent}; ETH spent "
                  f"{eth_before - chain.w3.eth.get_balance(settler(chain))} wei; the wallet still holds "
                  f"{chain.balance(wallet)}")
        assert [tx for tx in sent if tx["status"] != 1] == [], detail
        assert sent_by_settler(chain) == sent_before, detail
        assert chain.balance(wallet) == PRICE and not any(a.get("success") for a in answers), detail
    finally:
        server.stop()
        ledger.close()


# -- 2. two replicas: a pending settlement broadcast again through the other's facilitator API -----


@pytest.fixture
def replicas(chain: Devchain, review_upstream: RecordingUpstream, postgres_database: str,
             tmp_path: Path) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    prefix = f"x402gw-review-fac-{uuid.uuid4().hex[:12]}:"
    env = {
        "X402GW_CATALOG": str(write_catalog(tmp_path, chain, review_upstream)),
        "X402GW_DEPLOYMENT_FILE": str(chain.deployment_file),
        "X402GW_DATABASE_URL": postgres_database,
        "X402GW_REDIS_URL": REDIS_URL,
        "X402GW_REDIS_PREFIX": prefix,
        "X402GW_RECEIPT_TIMEOUT_SECONDS": "1",
        "X402GW_RESOLVE_PENDING_SECONDS": "3600",
        "X402GW_SERVE_FACILITATOR": "true",
    }
    processes = [GatewayProcess(env, tmp_path, tmp_path / f"replica{i}.log") for i in range(2)]
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda process: process.start(), processes))
        yield processes[0], processes[1]
    finally:
        for process in processes:
            process.stop()
        try:
            client = redis.Redis.from_url(REDIS_URL)
            for key in client.scan_iter(match=f"{prefix}*"):
                client.delete(key)
            client.close()
        except redis.RedisError:
            pass


def rebuilt_from_pool(chain: Devchain, tx_hash: str, requirements: dict[str, Any]) -> dict[str, Any]:
    """What anyone watching the node's pool can post: the payment, rebuilt from the settlement's calldata."""
    tx = chain.w3.eth.get_transaction(tx_hash)  # type: ignore[arg-type]
    data = bytes(tx["input"])
    assert "0x" + data[:4].hex() == SEL_TRANSFER_WITH_AUTHORIZATION, data[:4].hex()
    from_, to, value, after, before, nonce, v, r, s = abi_decode(
        ["address", "address", "uint256", "uint256", "uint256", "bytes32", "uint8", "bytes32", "bytes32"], data[4:])
    return {
        "x402Version": 2,
        "accepted": requirements,
        "payload": {
            "signature": "0x" + (r + s + bytes([v])).hex(),
            "authorization": {"from": Web3.to_checksum_address(from_), "to": Web3.to_checksum_address(to),
                              "value": str(value), "validAfter": str(after), "validBefore": str(before),
                              "nonce": "0x" + nonce.hex()},
        },
    }


def test_a_settlement_pending_on_one_replica_is_not_broadcast_again_by_the_others_facilitator_api(
    chain: Devchain, replicas: tuple[GatewayProcess, GatewayProcess], postgres_database: str,
    request: pytest.FixtureRequest,
) -> None:
    one, two = replicas
    payer_key = chain_actions.fresh_payer(chain.w3, chain.token, chain.key(FUNDER), 3 * PRICE)
    payer = Payer(payer_key)
    with httpx.Client(base_url=one.url, timeout=60) as client:
        offer = offer_of(client.get("/r/2"))
    payment = payer.sign(offer.accepts[0], resource=offer.resource).to_wire()
    ledger = open_ledger(postgres_database)  # the replicas' shared ledger
    try:
        sent_before, payee_before, payer_before = sent_by_settler(chain), chain.balance(PAY_TO), chain.balance(payer.address)
        eth_before = chain.w3.eth.get_balance(settler(chain))
        first_block = chain.w3.eth.block_number + 1
        mine: Callable[[], None] = request.getfixturevalue("manual_mining")  # blocks are late from here

        with httpx.Client(base_url=one.url, timeout=60) as client:
            first = client.get("/r/2", headers={"PAYMENT-SIGNATURE": encode_header(payment)})
        assert first.status_code == 503 and first.json()["error"] == "settlement_pending", first.text
        [row] = [r for r in ledger.all() if r.payer.lower() == payer.address.lower()]
        assert row.tx_hash and sent_by_settler(chain) - sent_before == 1

        rebuilt = rebuilt_from_pool(chain, row.tx_hash, payment["accepted"])
        again = httpx.post(f"{two.url}/facilitator/settle", json=facilitator_body(rebuilt, payment["accepted"]),
                           timeout=60)
        broadcasts = sent_by_settler(chain) - sent_before
        mine()
        wait_for(lambda: chain.w3.eth.get_transaction_count(settler(chain)) == sent_by_settler(chain),
                 "every settlement transaction mined")
        sent = settler_txs(chain, first_block)
        reverted = [tx for tx in sent if tx["status"] != 1]
        detail = (f"replica two's /facilitator/settle said {again.status_code} {again.text[:300]!r}; the settlement "
                  f"key sent {broadcasts} transaction(s) for one payment: {sent}; ETH spent "
                  f"{eth_before - chain.w3.eth.get_balance(settler(chain))} wei")
        assert reverted == [], detail
        assert broadcasts == 1 and len(sent) == 1 and sent[0]["hash"] == row.tx_hash, detail
        assert again.json().get("success") is not True or again.json().get("transaction") == row.tx_hash, detail
        # One payment, one transfer.
        assert payer_before - chain.balance(payer.address) == PRICE, detail
        assert chain.balance(PAY_TO) - payee_before == PRICE, detail
    finally:
        ledger.close()
