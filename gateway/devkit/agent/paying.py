"""The paying agent: choose an offer it may sign, sign it within its limits, count it, call again.

Every authorization is counted as spent when it is signed, receipt or not.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import ValidationError
from x402.extensions.payment_identifier import append_payment_identifier_to_extensions, generate_payment_id

from gateway.devkit.agent.offers import (
    SpendLimitExceeded,
    UntrustedOffer,
    offer_problem,
)
from gateway.devkit.agent.tokens import TokenFacts, TokenUnverifiable, _rpc
from gateway.devkit.payer import Payer
from gateway.protocol.offers import PAYMENT_IDENTIFIER
from settlement.errors import PaymentDecodeError
from settlement.x402.codec import decode_header_json, encode_header
from settlement.x402.wire import (
    PaymentPayload,
    PaymentRequired,
    PaymentRequirements,
    ResourceInfo,
    SettleResponse,
)

__all__ = ["DEFAULT_MAX_VALID_SECONDS", "CallResult", "PayingAgent", "SignedPayment", "body_of"]

# The longest authorization the agent signs by default: a signed, unused authorization is a cheque
# anyone holding it can cash until validBefore.
DEFAULT_MAX_VALID_SECONDS = 600


@dataclass
class SignedPayment:
    """One authorization the agent signed: counted as spent from the moment it was signed."""

    method: str
    url: str
    network: str
    asset: str
    pay_to: str
    amount: int
    valid_before: int
    nonce: str
    receipt: SettleResponse | None = None


@dataclass
class CallResult:
    method: str
    url: str
    status: int
    price_atomic: int | None
    receipt: SettleResponse | None
    body: Any
    payment: SignedPayment | None = None

    @property
    def tx_hash(self) -> str | None:
        return self.receipt.transaction if self.receipt and self.receipt.success else None


def _atomic_limit(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative int of atomic units, got {value!r}")
    return value


class PayingAgent:
    """Pays in one token (``token``, trusted facts) within ``max_spend_atomic`` in total and
    ``max_per_call_atomic`` (default: the total) per call."""

    def __init__(
        self,
        private_key: str,
        token: TokenFacts,
        *,
        max_spend_atomic: int,
        max_per_call_atomic: int | None = None,
        max_valid_seconds: int = DEFAULT_MAX_VALID_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(token, TokenFacts):
            raise TypeError("token must be TokenFacts read from the chain (read_token_facts) or pinned (pinned_token)")
        self.payer = Payer(private_key)
        self.token = token
        self.max_spend_atomic = _atomic_limit(max_spend_atomic, "max_spend_atomic")
        self.max_per_call_atomic = _atomic_limit(
            max_spend_atomic if max_per_call_atomic is None else max_per_call_atomic, "max_per_call_atomic"
        )
        if isinstance(max_valid_seconds, bool) or not isinstance(max_valid_seconds, int) or max_valid_seconds < 1:
            raise ValueError("max_valid_seconds must be a positive int")
        self.max_valid_seconds = max_valid_seconds
        self._clock = clock
        self.signed: list[SignedPayment] = []
        self._signing = threading.Lock()

    @property
    def spent_atomic(self) -> int:
        """Everything signed so far, settled or not: a signed authorization can be used by whoever holds it."""
        return sum(payment.amount for payment in self.signed)

    @property
    def remaining_atomic(self) -> int:
        return self.max_spend_atomic - self.spent_atomic

    def _problem(
        self, option: PaymentRequirements, expect_pay_to: str | None, expect_max_amount: int | None
    ) -> tuple[str, str] | None:
        """Why ``option`` is refused (see ``offers.offer_problem``), or None when it can be signed."""
        return offer_problem(
            option, self.token, spent=self.spent_atomic, max_spend=self.max_spend_atomic,
            max_per_call=self.max_per_call_atomic, expect_pay_to=expect_pay_to, expect_max_amount=expect_max_amount,
        )

    def choose(
        self, required: PaymentRequired, *, expect_pay_to: str | None = None, expect_max_amount: int | None = None
    ) -> PaymentRequirements:
        """The first option the agent may sign; ``PaymentRefused`` (nothing signed) otherwise."""
        problems: list[tuple[str, str]] = []
        for option in required.accepts:
            problem = self._problem(option, expect_pay_to, expect_max_amount)
            if problem is None:
                return option
            problems.append(problem)
        if not problems:
            raise UntrustedOffer("the offer has no payment options")
        limits = [message for kind, message in problems if kind == "limit"]
        if limits:
            raise SpendLimitExceeded(limits[0])
        raise UntrustedOffer("no acceptable payment option: " + "; ".join(message for _, message in problems))

    def sign(
        self, option: PaymentRequirements, *, resource: ResourceInfo | None = None, method: str = "", url: str = ""
    ) -> tuple[PaymentPayload, SignedPayment]:
        """Sign ``option`` (checked again here) and count it as spent at once."""
        with self._signing:  # the check and the count as one step: two threads never both pass the budget
            problem = self._problem(option, None, None)
            if problem is not None:
                raise (SpendLimitExceeded if problem[0] == "limit" else UntrustedOffer)(problem[1])
            now = int(self._clock())
            valid_before = now + min(option.max_timeout_seconds, self.max_valid_seconds)
            payload = self.payer.sign(option, resource=resource, now=now, valid_before=valid_before)
            auth = payload.payload["authorization"]
            record = SignedPayment(
                method=method, url=url, network=option.network, asset=option.asset, pay_to=auth["to"],
                amount=int(auth["value"]), valid_before=int(auth["validBefore"]), nonce=auth["nonce"],
            )
            self.signed.append(record)  # counted before it leaves: receipt or not, it can be cashed
        return payload, record

    async def _nonce_used(self, record: SignedPayment) -> bool | None:
        """Whether the chain shows this payment's authorization used (one ``eth_call`` at the RPC the
        token's facts came from); None with no chain to ask (pinned facts), False when it cannot be
        read (the receipt is then not taken on the gateway's word alone)."""
        if not self.token.source.startswith("chain "):
            return None
        data = _AUTHORIZATION_STATE + bytes.fromhex(self.payer.address[2:].lower()).rjust(32, b"\0") \
            + bytes.fromhex(record.nonce.removeprefix("0x"))
        try:
            async with httpx.AsyncClient(timeout=10.0) as http:
                out = await _rpc(http, self.token.source[len("chain "):], "eth_call",
                                 [{"to": self.token.address, "data": "0x" + data.hex()}, "latest"])
            return int(str(out), 16) != 0
        except (httpx.HTTPError, TokenUnverifiable, ValueError):
            return False

    async def call(
        self,
        client: httpx.AsyncClient,
        method: str,
        url: str,
        *,
        expect_pay_to: str | None = None,
        expect_max_amount: int | None = None,
        **kwargs: Any,
    ) -> CallResult:
        """Request ``url``; answer a 402 with one payment within the limits. ``expect_pay_to`` and
        ``expect_max_amount`` (the advertised payee and price) refuse an offer that differs."""
        first = await client.request(method, url, **kwargs)
        if first.status_code != 402 or "payment-required" not in first.headers:
            return CallResult(method, url, first.status_code, None, None, body_of(first))
        try:
            required = PaymentRequired.model_validate(decode_header_json(first.headers["payment-required"]))
        except (PaymentDecodeError, ValidationError, ValueError):
            raise UntrustedOffer("the 402's PAYMENT-REQUIRED header is not a valid x402 v2 offer") from None
        option = self.choose(required, expect_pay_to=expect_pay_to, expect_max_amount=expect_max_amount)
        payment, record = self.sign(option, resource=required.resource, method=method, url=url)
        # An id of the agent's own (x402's payment-identifier, where the offer declares it), on no
        # chain: once the payment settles its signed payload is public (the transaction's calldata),
        # and a gateway replays an answer only to the id it was first sent with.
        extensions = append_payment_identifier_to_extensions(dict(required.extensions or {}), generate_payment_id("agent_"))
        if PAYMENT_IDENTIFIER in extensions:
            payment = payment.model_copy(update={"extensions": {**(payment.extensions or {}),
                                                                PAYMENT_IDENTIFIER: extensions[PAYMENT_IDENTIFIER]}})
        headers = dict(kwargs.pop("headers", None) or {})
        headers["PAYMENT-SIGNATURE"] = encode_header(payment)
        paid = await client.request(method, url, headers=headers, **kwargs)
        receipt = None
        if "payment-response" in paid.headers:
            try:
                receipt = SettleResponse.model_validate(decode_header_json(paid.headers["payment-response"]))
            except (PaymentDecodeError, ValidationError, ValueError):
                receipt = None  # a malformed receipt is no receipt; the payment stays counted
        if receipt is not None and not _receipt_fits(receipt, record, self.payer.address):
            receipt = None  # another network's, payer's or amount's receipt (a public fact) is no receipt
        if receipt is not None and receipt.success:
            # A success is kept only if the chain shows this authorization used (another payment's
            # receipt, resent or stripped of its payer and amount, would pass for it); with no chain
            # to ask (pinned token facts), only a receipt that names this payer and amount.
            used = await self._nonce_used(record)
            if used is False or (used is None and (receipt.payer is None or receipt.amount is None)):
                receipt = None
        record.receipt = receipt
        return CallResult(method, url, paid.status_code, record.amount, receipt, body_of(paid), record)


def _receipt_fits(receipt: SettleResponse, record: SignedPayment, payer: str) -> bool:
    """Whether a receipt can be this payment's: its network, and the payer and amount where it names them."""
    if receipt.network != record.network or (receipt.payer is not None and receipt.payer.lower() != payer.lower()):
        return False
    return receipt.amount is None or receipt.amount == str(record.amount)


_AUTHORIZATION_STATE = bytes.fromhex("e94a0102")  # authorizationState(address,bytes32)


def body_of(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text
