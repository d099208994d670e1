"""LocalFacilitator against an in-memory chain: every verify rejection and every settle outcome."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from eth_hash.auto import keccak

from gateway.devkit.payer import Payer
from settlement.chain.client import LogEntry, Receipt, RpcError
from settlement.errors import BroadcastUncertain, ChainUnavailable
from settlement.schemes.eip712 import TransferAuthorization
from settlement.schemes.exact_guards import revert_reason_code
from settlement.schemes.exact_local import LocalFacilitator
from settlement.x402.wire import PaymentPayload, PaymentRequirements, SettleResponse, VerifyResponse

NOW = 1_700_000_000
CHAIN_ID = 31337
NETWORK = f"eip155:{CHAIN_ID}"
TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
PAYER_KEY = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"
OTHER_KEY = "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a"
PAY_TO = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
STRANGER = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
PRICE = 10_000
NONCE = bytes.fromhex("42" * 32)
TX_HASH = "0x" + "cd" * 32
BLOCK = 77

TRANSFER_TOPIC = keccak(b"Transfer(address,address,uint256)")


def topic(address: str) -> bytes:
    return bytes.fromhex(address[2:]).rjust(32, b"\x00")


def transfer_log(token: str, from_: str, to: str, value: int) -> LogEntry:
    return LogEntry(
        address=token, topics=(TRANSFER_TOPIC, topic(from_), topic(to)), data=value.to_bytes(32, "big")
    )


@dataclass
class FakeChain:
    """The Chain protocol over dicts. ``receipt_mode`` picks what the broadcast transaction does:
    "mined" (transfer with its log), "pending" (no receipt yet), "reverted" (status 0) or
    "no_log" (status 1 without a Transfer event)."""

    chain_id: int = CHAIN_ID
    balances: dict[tuple[str, str], int] = field(default_factory=dict)
    used: set[tuple[str, str, bytes]] = field(default_factory=set)
    receipt_mode: str = "mined"
    send_error: Exception | None = None
    receipt_error: Exception | None = None
    use_nonce_on_revert: bool = False
    sent: list[tuple[str, TransferAuthorization, bytes]] = field(default_factory=list)
    receipts: dict[str, Receipt] = field(default_factory=dict)

    def fund(self, owner: str, amount: int, token: str = TOKEN) -> None:
        self.balances[(token.lower(), owner.lower())] = amount

    async def find_authorization_used(self, token: str, authorizer: str, nonce: bytes) -> Receipt | None:
        return None  # no logs here: a used nonce is never found paid elsewhere

    async def authorization_state(self, token: str, authorizer: str, nonce: bytes) -> bool:
        return (token.lower(), authorizer.lower(), nonce) in self.used

    async def balance_of(self, token: str, owner: str) -> int:
        return self.balances.get((token.lower(), owner.lower()), 0)

    async def send_transfer_with_authorization(
        self, token: str, auth: TransferAuthorization, signature: bytes, before_send: Any = None
    ) -> str:
        if self.send_error is not None:
            raise self.send_error
        self.sent.append((token, auth, signature))
        tx_hash = "0x" + keccak(json.dumps([token, auth.from_, auth.nonce.hex(), len(self.sent)]).encode()).hex()
        key = (token.lower(), auth.from_.lower(), auth.nonce)
        if self.receipt_mode == "mined":
            self.used.add(key)
            self.balances[(token.lower(), auth.from_.lower())] -= auth.value
            to_key = (token.lower(), auth.to.lower())
            self.balances[to_key] = self.balances.get(to_key, 0) + auth.value
            logs = (transfer_log(token, auth.from_, auth.to, auth.value),)
            self.receipts[tx_hash] = Receipt(tx_hash=tx_hash, status=1, block_number=BLOCK, logs=logs)
        elif self.receipt_mode == "no_log":
            self.receipts[tx_hash] = Receipt(tx_hash=tx_hash, status=1, block_number=BLOCK)
        elif self.receipt_mode == "reverted":
            if self.use_nonce_on_revert:
                self.used.add(key)  # another transaction used the authorization first
            self.receipts[tx_hash] = Receipt(tx_hash=tx_hash, status=0, block_number=BLOCK)
        return tx_hash

    async def wait_for_receipt(self, tx_hash: str, timeout: float) -> Receipt | None:
        if self.receipt_error is not None:
            raise self.receipt_error
        return self.receipts.get(tx_hash)

    async def get_code(self, address: str) -> bytes:
        return b""  # every payer here is an EOA (exact_guards' simulation is tested against anvil)


def requirements(**changes: Any) -> PaymentRequirements:
    fields: dict[str, Any] = {
        "scheme": "exact",
        "network": NETWORK,
        "amount": str(PRICE),
        "asset": TOKEN,
        "pay_to": PAY_TO,
        "max_timeout_seconds": 60,
        "extra": {"name": "USD Coin", "version": "2"},
    }
    fields.update(changes)
    return PaymentRequirements(**fields)


def payment(reqs: PaymentRequirements | None = None, *, key: str = PAYER_KEY, **sign: Any) -> PaymentPayload:
    sign.setdefault("now", NOW)
    sign.setdefault("nonce", NONCE)
    return Payer(key).sign(reqs or requirements(), **sign)


PAYER = Payer(PAYER_KEY).address


@pytest.fixture
def chain() -> FakeChain:
    chain = FakeChain()
    chain.fund(PAYER, 10 * PRICE)
    return chain


@pytest.fixture
def facilitator(chain: FakeChain) -> LocalFacilitator:
    return LocalFacilitator({NETWORK: chain}, receipt_timeout=0.01, clock=lambda: NOW)


def verify(facilitator: LocalFacilitator, payload: PaymentPayload, reqs: PaymentRequirements | None = None) -> VerifyResponse:
    return asyncio.run(facilitator.verify(payload, reqs or requirements()))


def settle(facilitator: LocalFacilitator, payload: PaymentPayload, reqs: PaymentRequirements | None = None) -> SettleResponse:
    return asyncio.run(facilitator.settle(payload, reqs or requirements()))


def rejected(response: VerifyResponse) -> str | None:
    assert response.is_valid is False
    return response.invalid_reason


# -- verify ----------------------------------------------------------------------------------------


def test_valid_payment(facilitator: LocalFacilitator) -> None:
    response = verify(facilitator, payment())

    assert response == VerifyResponse(is_valid=True, payer=PAYER)


def test_valid_at_the_window_edges(facilitator: LocalFacilitator) -> None:
    assert verify(facilitator, payment(valid_before=NOW + 6)).is_valid
    assert verify(facilitator, payment(valid_before=NOW + 60 + 600)).is_valid
    assert verify(facilitator, payment(valid_after=NOW - 1)).is_valid
    # The token takes it only in a block dated after validAfter: one valid from this very second is
    # not yet (a block dated now would revert it on our gas).
    assert rejected(verify(facilitator, payment(valid_after=NOW))) == "invalid_exact_evm_payload_authorization_valid_after"


def test_addresses_compare_case_insensitively(facilitator: LocalFacilitator) -> None:
    reqs = requirements(pay_to=PAY_TO.lower(), asset=TOKEN.lower())

    assert verify(facilitator, payment(reqs), reqs).is_valid


def test_recipient_mismatch(facilitator: LocalFacilitator) -> None:
    response = verify(facilitator, payment(overrides={"to": STRANGER}))

    assert rejected(response) == "invalid_exact_evm_payload_recipient_mismatch"


@pytest.mark.parametrize("value", [PRICE - 1, PRICE + 1])
def test_value_mismatch(facilitator: LocalFacilitator, value: int) -> None:
    response = verify(facilitator, payment(overrides={"value": value}))

    assert rejected(response) == "invalid_exact_evm_payload_authorization_value_mismatch"


@pytest.mark.parametrize("valid_before", [NOW + 5, NOW, NOW - 1000, 0])
def test_expired(facilitator: LocalFacilitator, valid_before: int) -> None:
    response = verify(facilitator, payment(valid_before=valid_before))

    assert rejected(response) == "invalid_exact_evm_payload_authorization_valid_before"


@pytest.mark.parametrize("valid_before", [NOW + 60 + 601, NOW + 86_400, 2**256 - 1])
def test_valid_too_long(facilitator: LocalFacilitator, valid_before: int) -> None:
    response = verify(facilitator, payment(valid_before=valid_before))

    assert rejected(response) == "invalid_exact_evm_payload_authorization_valid_before"


@pytest.mark.parametrize("valid_after", [NOW + 1, NOW + 3600])
def test_not_yet_valid(facilitator: LocalFacilitator, valid_after: int) -> None:
    response = verify(facilitator, payment(valid_after=valid_after))

    assert rejected(response) == "invalid_exact_evm_payload_authorization_valid_after"


def test_signature_by_another_key(facilitator: LocalFacilitator) -> None:
    response = verify(facilitator, payment(key=OTHER_KEY, overrides={"from_": PAYER}))

    assert rejected(response) == "invalid_exact_evm_payload_signature"


def test_signature_for_another_token_domain(facilitator: LocalFacilitator) -> None:
    signed = payment(requirements(extra={"name": "USDC", "version": "2"}))

    assert rejected(verify(facilitator, signed)) == "invalid_exact_evm_payload_signature"


def test_malleated_high_s_signature(facilitator: LocalFacilitator) -> None:
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    signed = payment()
    raw = bytes.fromhex(signed.payload["signature"][2:])
    high = raw[:32] + (n - int.from_bytes(raw[32:64], "big")).to_bytes(32, "big") + bytes([55 - raw[64]])
    tampered = signed.model_copy(update={"payload": {**signed.payload, "signature": "0x" + high.hex()}})

    assert rejected(verify(facilitator, tampered)) == "invalid_exact_evm_payload_signature"


def test_network_not_served(facilitator: LocalFacilitator) -> None:
    reqs = requirements(network="eip155:8453")

    assert rejected(verify(facilitator, payment(reqs), reqs)) == "invalid_exact_evm_failed_to_get_network_config"


def test_network_not_evm(facilitator: LocalFacilitator) -> None:
    reqs = requirements(network="solana:mainnet")
    signed = payment().model_copy(update={"accepted": reqs})

    assert rejected(verify(facilitator, signed, reqs)) == "invalid_exact_evm_failed_to_get_network_config"


def test_network_mismatch(facilitator: LocalFacilitator) -> None:
    signed = payment(requirements(network="eip155:8453"))

    assert rejected(verify(facilitator, signed)) == "network_mismatch"


@pytest.mark.parametrize("extra", [None, {}, {"name": "USD Coin"}, {"version": "2"}, {"name": 1, "version": "2"}])
def test_missing_eip712_domain(facilitator: LocalFacilitator, extra: dict[str, Any] | None) -> None:
    response = verify(facilitator, payment(), requirements(extra=extra))

    assert rejected(response) == "missing_eip712_domain"


def test_nonce_already_used(facilitator: LocalFacilitator, chain: FakeChain) -> None:
    chain.used.add((TOKEN.lower(), PAYER.lower(), NONCE))

    response = verify(facilitator, payment())

    assert rejected(response) == "invalid_exact_evm_nonce_already_used"
    assert response.payer == PAYER


def test_insufficient_balance(facilitator: LocalFacilitator, chain: FakeChain) -> None:
    chain.fund(PAYER, PRICE - 1)

    response = verify(facilitator, payment())

    assert rejected(response) == "invalid_exact_evm_insufficient_balance"
    assert response.payer == PAYER


def test_balance_equal_to_price_is_enough(facilitator: LocalFacilitator, chain: FakeChain) -> None:
    chain.fund(PAYER, PRICE)

    assert verify(facilitator, payment()).is_valid


@pytest.mark.parametrize("where", ["both", "requirements", "payload"])
def test_unsupported_scheme(facilitator: LocalFacilitator, where: str) -> None:
    upto = requirements(scheme="upto")
    signed = payment(upto if where in ("both", "payload") else None)
    reqs = upto if where in ("both", "requirements") else requirements()

    assert rejected(verify(facilitator, signed, reqs)) == "unsupported_scheme"


def test_exact_payload_not_parseable(facilitator: LocalFacilitator) -> None:
    signed = payment().model_copy(update={"payload": {"signature": "0x00"}})

    assert rejected(verify(facilitator, signed)) == "invalid_payload"


# A trailing newline passes the wire regexes ("$" matches before a final "\n"); the facilitator then
# crashes in bytes.fromhex / to_checksum_address instead of answering a rejection value.
@pytest.mark.parametrize(
    ("field", "value"),
    [("signature", "0x" + "a" * 129 + "\n"), ("from", PAYER + "\n")],
    ids=["signature", "from"],
)
def test_trailing_newline_is_a_rejection_not_a_crash(facilitator: LocalFacilitator, field: str, value: str) -> None:
    signed = payment()
    inner = json.loads(json.dumps(signed.payload))
    if field == "signature":
        inner["signature"] = value
    else:
        inner["authorization"][field] = value
    tampered = signed.model_copy(update={"payload": inner})

    assert rejected(verify(facilitator, tampered)) == "invalid_payload"
    assert settle(facilitator, tampered).error_reason == "invalid_payload"


def test_verify_does_not_touch_the_chain_for_offline_rejections() -> None:
    class Untouchable(FakeChain):
        async def authorization_state(self, token: str, authorizer: str, nonce: bytes) -> bool:
            raise AssertionError("chain read for a payment rejected offline")

    facilitator = LocalFacilitator({NETWORK: Untouchable()}, clock=lambda: NOW)

    assert rejected(verify(facilitator, payment(overrides={"value": 1}))) == (
        "invalid_exact_evm_payload_authorization_value_mismatch"
    )


# -- settle ----------------------------------------------------------------------------------------


def test_settle_success(facilitator: LocalFacilitator, chain: FakeChain) -> None:
    signed = payment()

    response = settle(facilitator, signed)

    assert response.success is True
    assert response.error_reason is None
    assert response.payer == PAYER
    assert response.network == NETWORK
    assert response.amount == str(PRICE)
    assert response.extra == {"blockNumber": BLOCK}
    [(token, auth, signature)] = chain.sent
    assert response.transaction == next(iter(chain.receipts))
    assert token == TOKEN
    assert (auth.from_, auth.to, auth.value, auth.nonce) == (PAYER, PAY_TO, PRICE, NONCE)
    assert (auth.valid_after, auth.valid_before) == (0, NOW + 60)
    assert "0x" + signature.hex() == signed.payload["signature"]
    assert asyncio.run(chain.balance_of(TOKEN, PAY_TO)) == PRICE


def test_settle_rejected_offline_sends_nothing(facilitator: LocalFacilitator, chain: FakeChain) -> None:
    response = settle(facilitator, payment(overrides={"to": STRANGER}))

    assert response.success is False
    assert response.error_reason == "invalid_exact_evm_payload_recipient_mismatch"
    assert response.transaction == ""
    assert chain.sent == []


def test_settle_pending_when_no_receipt(facilitator: LocalFacilitator, chain: FakeChain) -> None:
    chain.receipt_mode = "pending"

    response = settle(facilitator, payment())

    assert response.success is False
    assert response.error_reason == "settlement_pending"
    assert response.payer == PAYER
    assert response.transaction.startswith("0x") and len(response.transaction) == 66
    assert len(chain.sent) == 1


def test_settle_reverted_because_nonce_used(facilitator: LocalFacilitator, chain: FakeChain) -> None:
    chain.receipt_mode = "reverted"
    chain.use_nonce_on_revert = True

    response = settle(facilitator, payment())

    assert response.success is False
    assert response.error_reason == "invalid_exact_evm_nonce_already_used"
    assert response.transaction == next(iter(chain.receipts))
    assert response.extra == {"blockNumber": BLOCK}


def test_settle_reverted_because_balance_dropped() -> None:
    class Draining(FakeChain):
        async def send_transfer_with_authorization(
            self, token: str, auth: TransferAuthorization, signature: bytes, before_send: Any = None
        ) -> str:
            tx_hash = await super().send_transfer_with_authorization(token, auth, signature, before_send)
            self.fund(PAYER, 0)  # spent elsewhere between verify and settle
            return tx_hash

    draining = Draining(receipt_mode="reverted")
    draining.fund(PAYER, PRICE)
    facilitator = LocalFacilitator({NETWORK: draining}, clock=lambda: NOW)

    assert settle(facilitator, payment()).error_reason == "invalid_exact_evm_insufficient_balance"


def test_settle_reverted_for_no_known_reason(facilitator: LocalFacilitator, chain: FakeChain) -> None:
    chain.receipt_mode = "reverted"

    response = settle(facilitator, payment())

    assert response.success is False
    assert response.error_reason == "transaction_failed"
    assert response.transaction != ""


def test_settle_without_transfer_event(facilitator: LocalFacilitator, chain: FakeChain) -> None:
    chain.receipt_mode = "no_log"

    response = settle(facilitator, payment())

    assert response.success is False
    assert response.error_reason == "invalid_exact_evm_transfer_event_mismatch"
    assert response.transaction == next(iter(chain.receipts))


@pytest.mark.parametrize(
    "log",
    [
        transfer_log(TOKEN, PAYER, PAY_TO, PRICE - 1),
        transfer_log(TOKEN, PAYER, STRANGER, PRICE),
        transfer_log(STRANGER, PAYER, PAY_TO, PRICE),
        transfer_log(TOKEN, STRANGER, PAY_TO, PRICE),
    ],
    ids=["value", "to", "token", "from"],
)
def test_settle_with_a_different_transfer_event(log: LogEntry) -> None:
    class WrongLog(FakeChain):
        async def wait_for_receipt(self, tx_hash: str, timeout: float) -> Receipt | None:
            return Receipt(tx_hash=tx_hash, status=1, block_number=BLOCK, logs=(log,))

    wrong = WrongLog()
    wrong.fund(PAYER, PRICE)
    facilitator = LocalFacilitator({NETWORK: wrong}, clock=lambda: NOW)

    assert settle(facilitator, payment()).error_reason == "invalid_exact_evm_transfer_event_mismatch"


def test_settle_refused_by_the_node(facilitator: LocalFacilitator, chain: FakeChain) -> None:
    chain.send_error = RpcError("eth_sendRawTransaction", "execution reverted: FiatTokenV2: authorization is expired")

    response = settle(facilitator, payment())

    assert response.success is False
    assert response.error_reason == "invalid_exact_evm_payload_authorization_valid_before"
    assert response.transaction == ""
    assert response.payer == PAYER


def test_settle_broadcast_uncertain(facilitator: LocalFacilitator, chain: FakeChain) -> None:
    chain.send_error = BroadcastUncertain(TX_HASH)

    response = settle(facilitator, payment())

    assert response.success is False
    assert response.error_reason == "settlement_pending"
    assert response.transaction == TX_HASH


def test_settle_receipt_wait_fails(facilitator: LocalFacilitator, chain: FakeChain) -> None:
    chain.receipt_error = ChainUnavailable("node went away")

    response = settle(facilitator, payment())

    assert response.success is False
    assert response.error_reason == "settlement_pending"
    [_] = chain.sent
    assert response.transaction == next(iter(chain.receipts))


def test_settle_chain_unavailable_before_broadcast_propagates(facilitator: LocalFacilitator, chain: FakeChain) -> None:
    chain.send_error = ChainUnavailable("connection refused")

    with pytest.raises(ChainUnavailable) as caught:
        settle(facilitator, payment())

    assert type(caught.value) is ChainUnavailable


def test_supported(facilitator: LocalFacilitator) -> None:
    assert facilitator.supported()["kinds"] == [{"x402Version": 2, "scheme": "exact", "network": NETWORK}]


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("execution reverted: FiatTokenV2: authorization is expired", "invalid_exact_evm_payload_authorization_valid_before"),
        ("execution reverted: FiatTokenV2: authorization is not yet valid", "invalid_exact_evm_payload_authorization_valid_after"),
        ("execution reverted: FiatTokenV2: authorization is used or canceled", "invalid_exact_evm_nonce_already_used"),
        ("execution reverted: ERC20: transfer amount exceeds balance", "invalid_exact_evm_insufficient_balance"),
        ("execution reverted: FiatTokenV2: invalid signature", "invalid_exact_evm_payload_signature"),
        ("EXECUTION REVERTED: AUTHORIZATION IS EXPIRED", "invalid_exact_evm_payload_authorization_valid_before"),
        ("execution reverted", "transaction_failed"),
        ("nonce too low", "transaction_failed"),
        ("", "transaction_failed"),
    ],
)
def test_revert_reason_code(message: str, code: str) -> None:
    assert revert_reason_code(message) == code


def test_settle_after_verify_recovers_the_signer_once(
    facilitator: LocalFacilitator, chain: FakeChain, monkeypatch: pytest.MonkeyPatch
) -> None:
    import settlement.schemes.exact_local as module

    calls: list[bytes] = []
    real = module.recover_signer

    def counting(digest: bytes, signature: bytes) -> str | None:
        calls.append(signature)
        return real(digest, signature)

    monkeypatch.setattr(module, "recover_signer", counting)
    signed = payment()
    assert verify(facilitator, signed).is_valid
    assert settle(facilitator, signed).success
    assert len(calls) == 1  # settle reused verify's recovery

    # The same authorization with another key's signature is its own entry: recovered, and refused.
    forged = payment(key=OTHER_KEY, overrides={"from_": PAYER})
    assert forged.payload["authorization"] == signed.payload["authorization"]
    assert rejected(verify(facilitator, forged)) == "invalid_exact_evm_payload_signature"
    assert len(calls) == 2


# -- griefing: zero amounts, self-transfers, caches keyed on caller data ---------------------------


@pytest.mark.parametrize(
    ("price", "value"), [(0, 0), (PRICE, 0)], ids=["requirements-amount-0", "authorization-value-0"]
)
def test_zero_amount_is_refused_and_settles_nothing(facilitator: LocalFacilitator, chain: FakeChain, price: int, value: int) -> None:
    reqs = requirements(amount=str(price))
    signed = payment(reqs, overrides={"value": value})
    assert rejected(verify(facilitator, signed, reqs)) == "invalid_exact_evm_payload_zero_amount"
    response = settle(facilitator, signed, reqs)
    assert (response.success, response.error_reason) == (False, "invalid_exact_evm_payload_zero_amount")
    assert chain.sent == []


def test_self_transfer_is_refused_and_settles_nothing(facilitator: LocalFacilitator, chain: FakeChain) -> None:
    reqs = requirements(pay_to=PAYER)
    signed = payment(reqs)  # a perfectly valid signature from PAYER to PAYER
    assert rejected(verify(facilitator, signed, reqs)) == "invalid_exact_evm_payload_self_transfer"
    lower = requirements(pay_to=PAYER.lower())
    assert rejected(verify(facilitator, payment(lower), lower)) == "invalid_exact_evm_payload_self_transfer"
    response = settle(facilitator, signed, reqs)
    assert (response.success, response.error_reason) == (False, "invalid_exact_evm_payload_self_transfer")
    assert chain.sent == []


def test_domain_fields_have_a_length_limit(facilitator: LocalFacilitator) -> None:
    import settlement.schemes.exact_local as module

    longest = "n" * module.MAX_DOMAIN_FIELD_CHARS
    reqs = requirements(extra={"name": longest, "version": longest})
    assert verify(facilitator, payment(reqs), reqs).is_valid  # signed over that domain: fine
    for extra in ({"name": longest + "n", "version": "2"}, {"name": "USD Coin", "version": "2" * 65_536}):
        reqs = requirements(extra=extra)
        assert rejected(verify(facilitator, payment(reqs), reqs)) == "invalid_eip712_domain"


def test_junk_signatures_with_64kb_domain_names_leave_no_memory_behind(facilitator: LocalFacilitator) -> None:
    """300 requests, each with its own 64 KB extra.name and a junk signature: nothing is kept."""
    import tracemalloc

    signed = payment()
    junk = signed.model_copy(update={"payload": {**signed.payload, "signature": "0x" + "11" * 65}})
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for i in range(300):
            reqs = requirements(extra={"name": f"{i:06d}" + "x" * 65_530, "version": "2"})
            assert rejected(verify(facilitator, junk, reqs)) is not None
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(facilitator._domains) == 0 and len(facilitator._signers) == 0
    assert after - before < 1_000_000  # the unbounded cache held ~20 MB here


def test_junk_signatures_are_not_cached(facilitator: LocalFacilitator) -> None:
    """Short, distinct domains that pass every field check, signed by the wrong key or not at all:
    the signature check refuses each, and neither cache gains an entry."""
    for i in range(50):
        reqs = requirements(extra={"name": f"Token {i}", "version": "2"})
        forged = payment(reqs, key=OTHER_KEY, overrides={"from_": PAYER})
        assert rejected(verify(facilitator, forged, reqs)) == "invalid_exact_evm_payload_signature"
    assert len(facilitator._domains) == 0 and len(facilitator._signers) == 0
    assert verify(facilitator, payment()).is_valid
    assert len(facilitator._domains) == 1 and len(facilitator._signers) == 1


def test_caches_are_bounded_least_recently_used_first(
    facilitator: LocalFacilitator, monkeypatch: pytest.MonkeyPatch
) -> None:
    import settlement.schemes.exact_local as module

    monkeypatch.setattr(module, "DOMAIN_CACHE_SIZE", 4)
    monkeypatch.setattr(module, "SIGNER_CACHE_SIZE", 4)
    first = payment()
    assert verify(facilitator, first).is_valid
    for i in range(10):
        reqs = requirements(extra={"name": f"Token {i}", "version": "2"})
        assert verify(facilitator, payment(reqs), reqs).is_valid
        assert verify(facilitator, first).is_valid  # used again: kept
    assert len(facilitator._domains) == 4 and len(facilitator._signers) == 4
    assert (NETWORK, TOKEN.lower(), "USD Coin", "2") in facilitator._domains
    assert (NETWORK, TOKEN.lower(), "Token 9", "2") in facilitator._domains
    assert (NETWORK, TOKEN.lower(), "Token 0", "2") not in facilitator._domains
