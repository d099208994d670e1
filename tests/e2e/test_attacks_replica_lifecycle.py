"""Attacks on the replica lifecycle, found by review and fixed (the tests hold the fixes: the
resolver's turn follows ``settling`` rows no live request holds (``Refunds.orphaned``) and sweeps
the last hours for settled upfront payments without their answer (``owe_lost_answers(sweep=True)``);
a turn whose round cannot reach a chain is given up, ``gateway.store.Turns.give_up``). The review: gateway processes (replicas) sharing one Redis prefix and one
PostgreSQL ledger, and what happens when one starts, dies and is never replaced, or stays up unable
to do the work it took its turn for. Real parts: a private anvil (automining switched off where a
settlement must wait in the pool), a recording upstream on loopback, real ``x402gw serve``
processes. Each test asserts the invariant of ``/work/shared/THREATS.md`` (never a charge without
the answer it paid for: a settled ``upfront`` payment whose answer never came is owed back) on
ledger rows, chain balances and upstream calls.

1. A replica killed (``kill -9``) and never restarted leaves its open work to nobody. The surviving
   replica's background resolver (``settlement.ledger.resolve.keep_resolving``) follows ``pending``
   rows only; a ``settling`` row is "left to its request (a live one holds them; a dead one's are
   resolved at start-up)", and the lost-answer sweep (``Refunds.owe_lost_answers``) looks at every
   settled row only at start-up, then only at the rows its own round just resolved. So a dead
   replica's upfront payment, charged on chain (its transaction landed after the kill, or before it
   while the upstream ran), stays unresolved and owes nothing, however long its lock has lapsed and
   however many rounds the survivor runs.

2. The background resolver runs on one replica at a time (``gateway.store.taking_turns``): the turn
   is kept by whoever holds it, each round, whether or not its round could do anything. A replica
   whose chain is unreachable (its RPC endpoint or its network path down) keeps the turn for as
   long as it lives; its rounds skip every row (``ChainUnavailable``), and the healthy replica,
   which made the pending payment and can read the chain, never resolves it.

Refuted, and so not kept here: a replica's start-up reconcile failing a live replica's ``settling``
row as "not_broadcast". On the local, batched and Permit2/upto paths the row becomes ``settling``
in the same write that records the transaction hash (``before_send`` -> ``begin_settlement``), so
the starting replica sees a hash, finds it unmined and marks the row ``pending``; the live replica's
``mark_settled`` is allowed from ``pending`` and it answers (tried with a settlement held in the pool,
one transaction and BatchSettler: settled, answered 200, charged once, no refund).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from eth_account import Account
from web3.exceptions import TransactionNotFound

from gateway.devkit.payer import Payer
from settlement.ledger import Payment, PaymentState
from settlement.schema import open_ledger
from settlement.x402.codec import encode_header
from tests.conftest import PAY_TO, Devchain, fresh_database, fresh_redis_prefix, offer_of, running_devchain
from tests.e2e.test_exactly_once import raw_request
from tests.support import chain_actions
from tests.support.polling import poll
from tests.support.processes import GatewayProcess
from tests.support.recording_upstream import RecordingUpstream, UpstreamCall

NETWORK = "eip155:31337"
REDIS_URL = "redis://127.0.0.1:6379/0"
FUNDER = 6  # funds each test's fresh payer (balances are compared as deltas)
PRICE = 3000  # 0.003 of the 6-decimal test USDC
ROUND_SECONDS = 0.2  # X402GW_RESOLVE_PENDING_SECONDS of every replica: a resolver round every 0.2 s
ROUNDS = 30  # how many rounds the survivor gets to do what a restart would have done (6 s)


def catalog_text(chain: Devchain, upstream: str, tool: str) -> str:
    return f"""
catalog: 1
owner: review-lifecycle
payment: {{network: "{NETWORK}", asset: "{chain.token}", asset_name: "USD Coin", asset_version: "2",
           decimals: 6, pay_to: "{PAY_TO}", max_timeout_seconds: 300}}
upstreams:
  default: {{base_url: "{upstream}", timeout_seconds: 30}}
tools:
  - name: {tool}
    description: Places an order (side effects), settled before the call
    method: GET
    path: /{tool}/{{item}}
    upstream_path: /u/{tool}/{{item}}
    price: "0.003"
    settle: upfront
"""


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    """A private anvil: these tests switch automining off and on (``manual_mining``)."""
    with running_devchain(tmp_path_factory.mktemp("review-lifecycle")) as private:
        yield private




@pytest.fixture
def database() -> Iterator[str]:
    """A PostgreSQL database of the test's own, shared by its replicas."""
    with fresh_database("review_lifecycle") as url:
        yield url


@pytest.fixture
def prefix() -> Iterator[str]:
    """The replicas' shared Redis prefix; every key under it is dropped after the test."""
    with fresh_redis_prefix("review-lifecycle") as prefix:
        yield prefix




def in_pool(chain: Devchain, tx_hash: str) -> Any:
    try:
        return chain.w3.eth.get_transaction(tx_hash)  # type: ignore[arg-type]
    except TransactionNotFound:
        return None


def settlement_key(chain: Devchain) -> str:
    """A fresh settlement account with gas money: each replica settles from its own."""
    account = Account.create()
    chain.w3.provider.make_request("anvil_setBalance", [account.address, hex(10**20)])  # type: ignore[arg-type]
    return "0x" + bytes(account.key).hex()


def lock_key(prefix: str, payer: str, nonce: str) -> str:
    return f"{prefix}pay:{NETWORK}:{payer.lower()}:{nonce.lower()}"


def turn_holder(store: redis.Redis, prefix: str) -> str:
    """The owner of the background resolver's turn (``taking_turns``: ``<pid>-<random>``), or ''."""
    value = store.get(f"{prefix}turn:resolve-pending")
    return value.decode() if isinstance(value, bytes) else ""


def holds_turn(replica: GatewayProcess) -> Callable[[str], bool]:
    assert replica.process is not None
    pid = replica.process.pid
    return lambda owner: owner.startswith(f"{pid}-")


class Fleet:
    """Replicas of one gateway: one catalog, one Redis prefix, one PostgreSQL ledger."""

    def __init__(self, chain: Devchain, recording: RecordingUpstream, tmp_path: Path, database: str, prefix: str,
                 tool: str) -> None:
        self.chain, self.tool, self.tmp_path = chain, tool, tmp_path
        catalog = tmp_path / f"{tool}.yaml"
        catalog.write_text(catalog_text(chain, recording.url, tool))
        self.common = {
            "X402GW_CATALOG": str(catalog), "X402GW_DEPLOYMENT_FILE": str(chain.deployment_file),
            "X402GW_DATABASE_URL": database, "X402GW_REDIS_URL": REDIS_URL, "X402GW_REDIS_PREFIX": prefix,
            "X402GW_RESOLVE_PENDING_SECONDS": str(ROUND_SECONDS),
        }
        self.replicas: list[GatewayProcess] = []

    def replica(self, name: str, **extra: str) -> GatewayProcess:
        env = {**self.common, "X402GW_SETTLEMENT_KEY": settlement_key(self.chain), **extra}
        replica = GatewayProcess(env, self.tmp_path, self.tmp_path / f"replica-{name}.log")
        self.replicas.append(replica)
        return replica

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()


def sign(gateway: GatewayProcess, key: str, path: str) -> tuple[str, str]:
    """A fresh payment for ``path``: the header and its nonce."""
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        offer = offer_of(client.get(path))
    payment = Payer(key).sign(offer.accepts[0], resource=offer.resource)
    return encode_header(payment), str(payment.payload["authorization"]["nonce"])


def refunded(payer_before: int) -> Callable[[tuple[Payment | None, int]], bool]:
    """(row, payer balance): the refund is owed on the row, or the payer has its money back."""
    return lambda seen: (seen[0] is not None and seen[0].refund_owed is not None) or seen[1] == payer_before


# -- 1. a replica killed and never restarted: the survivor never resolves nor refunds its work ---------


@pytest.mark.parametrize("killed", ["settlement_in_pool", "upstream_running"])
def test_a_replica_killed_and_never_restarted_has_its_charged_payer_owed_by_the_survivor(
    chain: Devchain, recording: RecordingUpstream, tmp_path: Path, database: str, prefix: str, killed: str,
    request: pytest.FixtureRequest,
) -> None:
    """Replicas A and B serve one upfront tool. A takes a paid call and is killed (``kill -9``; a
    node lost, a scale-down, an OOM kill) either while its settlement waits in the pool (``settling``,
    hash written ahead; it lands after the kill) or while the upstream runs (``settled``, no answer
    yet). A is never restarted. The payer is charged on chain and never gets the answer; nothing
    will ever answer that request. After A's payment lock lapsed and B has run the background
    resolver for many rounds (B holds the resolver's turn), the ledger must say what a restart of
    A would have said: the payment settled, and its price owed back (or paid back)."""
    tool = f"lost_order_{killed}"
    fleet = Fleet(chain, recording, tmp_path, database, prefix, tool)
    a = fleet.replica("a", X402GW_RECEIPT_TIMEOUT_SECONDS="60")
    b = fleet.replica("b", X402GW_RECEIPT_TIMEOUT_SECONDS="60")
    key = chain_actions.fresh_payer(chain.w3, chain.token, chain.key(FUNDER), 50_000)
    payer = Account.from_key(key).address
    called, release = threading.Event(), threading.Event()

    def hold(call: UpstreamCall) -> None:  # A's upstream is running: settled, no answer yet
        called.set()
        release.wait(60)

    store = redis.Redis.from_url(REDIS_URL)
    ledger = open_ledger(database)
    payer_before, pay_to_before = chain.balance(payer), chain.balance(PAY_TO)
    upstream_before = recording.count(tool)
    try:
        a.start()
        b.start()
        header, nonce = sign(a, key, f"/{tool}/1")
        if killed == "settlement_in_pool":
            mine: Callable[[], None] = request.getfixturevalue("manual_mining")
            sock = raw_request(a.port, f"/{tool}/1", header)
            row = poll(lambda: next(iter(ledger.all()), None), lambda r: r is not None and r.tx_hash is not None, 30)
            assert row is not None and row.state == PaymentState.SETTLING, row
            assert poll(lambda: in_pool(chain, str(row.tx_hash)), bool, 10), "A's settlement never reached the node"
            a.kill9()  # between the broadcast and its receipt
            sock.close()
            mine()  # A's settlement lands after A died
        else:
            recording.on(tool, hold)
            sock = raw_request(a.port, f"/{tool}/1", header)
            assert called.wait(60), f"A never called its upstream: {a.log_tail()}"
            [row] = ledger.all()
            assert row.state == PaymentState.SETTLED and row.upstream_status is None, row
            a.kill9()  # its upstream is running: the answer dies with A
            sock.close()
            release.set()
        # A's payment lock would lapse after its TTL (minutes here: 20 s chain steps, the receipt and
        # upstream timeouts, a 30 s margin): fast-forwarded, as that much time passing does.
        lock = lock_key(prefix, payer, nonce)
        assert store.get(lock) is not None, "A's request held no payment lock"
        store.pexpire(lock, 1)
        assert poll(lambda: store.get(lock), lambda owner: owner is None, 5) is None
        # B, the survivor, takes the resolver's turn once A's has lapsed (1.5 rounds): its rounds run.
        holder = poll(lambda: turn_holder(store, prefix), holds_turn(b), 10)
        assert holds_turn(b)(holder), f"B never took the resolver's turn (held by {holder!r}): {b.log_tail()}"
        charged = payer_before - chain.balance(payer)
        assert charged == PRICE and chain.balance(PAY_TO) - pay_to_before == PRICE  # the money moved
        # As many rounds as a restart's start-up would need, and many more.
        seen = poll(lambda: (ledger.get(row.id), chain.balance(payer)), refunded(payer_before),
                    ROUND_SECONDS * ROUNDS)
        final, balance = seen
        stored = ledger.stored_response(row.id)
        still_b = turn_holder(store, prefix)
    finally:
        release.set()
        recording.on(tool, None)
        fleet.stop()
        ledger.close()
        store.close()
    upstream_calls = recording.count(tool) - upstream_before
    assert upstream_calls == (0 if killed == "settlement_in_pool" else 1)
    assert stored is None  # no answer exists for this payment: nobody will ever serve it
    assert final is not None
    assert (final.state, final.refund_owed) == (PaymentState.SETTLED, PRICE) or balance == payer_before, (
        f"A died ({killed}) and was never restarted: the payer is charged {payer_before - balance} on chain "
        f"(payTo credited), got no answer (upstream calls: {upstream_calls}, none stored), and after "
        f"{ROUNDS} rounds of B's resolver (turn holder {still_b!r}) with A's lock lapsed the ledger row is still "
        f"{final.state} (tx {final.tx_hash}) with refund_owed={final.refund_owed}: only a start-up reconciles a "
        f"dead replica's open rows and lost answers"
    )


# -- 2. the resolver's turn kept by a replica that cannot read the chain ------------------------------


class CutRelay:
    """A TCP relay in front of the anvil for one replica: forwards both ways until ``cut()``, then
    drops every connection and refuses new ones (its RPC endpoint, or its path to it, gone)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._cut = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self._cut.is_set():
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if self._cut.is_set():
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.cut()
        self._server.close()


def test_a_replica_that_cannot_reach_the_chain_gives_the_resolver_turn_to_one_that_can(
    chain: Devchain, recording: RecordingUpstream, tmp_path: Path, database: str, prefix: str,
    request: pytest.FixtureRequest,
) -> None:
    """Replica A holds the background resolver's turn; then its RPC endpoint goes away (A stays up:
    it still answers /healthz and holds its Redis turn). Replica B, healthy, takes an upfront call
    whose settlement is not mined within B's receipt timeout: 503 ``settlement_pending``, the
    upstream not called, the row ``pending``. The transaction lands. B can read the chain, but the
    turn is A's: A's rounds skip the row (chain unavailable) and keep the turn. The payer, charged
    for a call that never ran, must be owed its price back within a few rounds, not only when A
    dies or the payer resends."""
    tool = "pending_order"
    relay = CutRelay(("127.0.0.1", int(chain.anvil.rpc_url.rsplit(":", 1)[1].split("/")[0])))
    fleet = Fleet(chain, recording, tmp_path, database, prefix, tool)
    a = fleet.replica("a", X402GW_RECEIPT_TIMEOUT_SECONDS="60", X402GW_RPC_URLS=f'{{"{NETWORK}": "{relay.url}"}}')
    b = fleet.replica("b", X402GW_RECEIPT_TIMEOUT_SECONDS="0.5")
    key = chain_actions.fresh_payer(chain.w3, chain.token, chain.key(FUNDER), 50_000)
    payer = Account.from_key(key).address
    store = redis.Redis.from_url(REDIS_URL)
    ledger = open_ledger(database)
    payer_before, pay_to_before = chain.balance(payer), chain.balance(PAY_TO)
    upstream_before = recording.count(tool)
    try:
        a.start()
        holder = poll(lambda: turn_holder(store, prefix), holds_turn(a), 10)
        assert holds_turn(a)(holder), f"A never took the resolver's turn: {holder!r}"
        b.start()
        relay.cut()  # A's chain is gone; A itself is up
        header, _ = sign(b, key, f"/{tool}/1")
        mine: Callable[[], None] = request.getfixturevalue("manual_mining")  # automining off from here
        pending = httpx.get(f"{b.url}/{tool}/1", headers={"PAYMENT-SIGNATURE": header}, timeout=60)
        assert pending.status_code == 503 and pending.json()["error"] == "settlement_pending", pending.text
        [row] = ledger.all()
        assert row.state == PaymentState.PENDING and row.tx_hash is not None, row
        mine()  # B's settlement lands
        assert payer_before - chain.balance(payer) == PRICE and chain.balance(PAY_TO) - pay_to_before == PRICE
        assert httpx.get(f"{a.url}/healthz", timeout=10).status_code == 200  # A lives on
        seen = poll(lambda: (ledger.get(row.id), chain.balance(payer)), refunded(payer_before),
                    ROUND_SECONDS * ROUNDS)
        final, balance = seen
        holder_after = turn_holder(store, prefix)
    finally:
        fleet.stop()
        relay.close()
        ledger.close()
        store.close()
    assert recording.count(tool) - upstream_before == 0  # the upfront call never ran
    assert final is not None
    assert (final.state, final.refund_owed) == (PaymentState.SETTLED, PRICE) or balance == payer_before, (
        f"the payer is charged {payer_before - balance} for an upfront call that never ran (503 settlement_pending, "
        f"its transaction mined since); after {ROUNDS} resolver rounds the row is still {final.state} with "
        f"refund_owed={final.refund_owed}: the resolver's turn is held by A ({holder_after!r}, A is pid "
        f"{a.process.pid if a.process else None}), whose chain is unreachable, and B, which can read it, never gets a turn"
    )
