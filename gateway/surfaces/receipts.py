"""Signed receipts for payers: the gateway's receipt key, and ``GET /receipts/{paymentId}`` (or
``GET /receipts/0x<settlement tx hash>``: ``{"receipts": [...]}``, the payer's in that transaction).

A receipt (``settlement.finance.receipts``) is derived from the ledger row and the receipt key, so
an old one is fetched by deriving it again. Only the payment's payer gets it: the request carries
an EIP-191 ``personal_sign`` by the payer's wallet over ``challenge_message`` (this gateway's
receipt signer, the payment id, a unix time), in two headers::

    X402GW-Receipt-Time: 1764851234
    X402GW-Receipt-Signature: 0x<65 bytes>

The time must be within ``MAX_SKEW_SECONDS`` of the gateway's clock, and each signed message is
taken once: the key is the message (wallet, payment, time), not the signature's bytes, which a
replayer could re-encode (ECDSA's s and n - s). It is kept in the state store until the time is out
of the window, and written only once the wallet is known to be the payment's payer, so strangers'
wallets fill nothing. Refusals, in the order checked: 401 ``receipt_auth_invalid`` (headers missing
or malformed, a signature that recovers to nobody), 401 ``receipt_auth_expired``, 404
``receipt_not_found`` (no such payment, or another wallet's: the two are not told apart), 401
``receipt_auth_replayed``, 409 ``receipt_not_settled``, 409 ``receipt_refunded``, 409
``receipt_unconfirmed`` (the audit trail's ``settled`` record of the payment disagrees with the
row, or the chain does not show the charge: ``receipt_evidence``), 503 ``receipt_unavailable``
(the chain does not answer); 404
``receipts_disabled`` when the gateway has no receipt key. EOAs only: a smart wallet's owner key
signs for it.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterable

from eth_account import Account
from eth_account.messages import encode_defunct
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import codes
from gateway.errors import GatewayConfigError, GatewayError
from gateway.headers import CACHE_CONTROL, X402GW_RECEIPT, X402GW_RECEIPT_SIGNATURE, X402GW_RECEIPT_TIME
from gateway.settings import Settings
from gateway.store import StateStore
from gateway.surfaces.receipt_evidence import SettlementEvidence
from settlement.chain.deployment import ANVIL_KEYS, LOCAL_CHAIN_ID
from settlement.errors import ChainUnavailable
from settlement.finance.receipts import (
    RECEIPT_DOMAIN_NAME,
    RECEIPT_DOMAIN_VERSION,
    RECEIPT_FORMAT,
    ReceiptSigner,
    settled_payments,
)
from settlement.ledger import Ledger, Payment, PaymentState
from settlement.x402.digits import is_digits

__all__ = ["MAX_SKEW_SECONDS", "ReceiptEndpoint", "challenge_message", "receipt_signer", "receipts_discovery"]

MAX_SKEW_SECONDS = 300
# The local chain's default receipt key: a public anvil key (account 8), never accepted elsewhere.
DEV_RECEIPT_KEY = ANVIL_KEYS[8]
_DEV_KEYS = frozenset(key.lower().removeprefix("0x") for key in ANVIL_KEYS)
_TX_HASH = re.compile(r"0x[0-9a-fA-F]{64}")
_PAYMENT_ID = re.compile(r"[0-9]{1,18}")  # ASCII only: str.isdigit() takes other scripts' digits


def receipt_signer(settings: Settings, networks: Iterable[str]) -> ReceiptSigner | None:
    """``X402GW_RECEIPT_KEY`` (or ``_FILE``); without it, on a gateway that sells on the local chain
    only, the anvil dev key; otherwise None (no receipts). A dev key with any other chain in the
    catalog is refused (``dev_key_on_public_chain``), as the settlement key is."""
    local_only = all(network == f"eip155:{LOCAL_CHAIN_ID}" for network in networks)
    if settings.receipt_key is None:
        return ReceiptSigner.from_key(DEV_RECEIPT_KEY) if local_only else None
    key = settings.receipt_key.get_secret_value()
    if not local_only and key.lower().removeprefix("0x") in _DEV_KEYS:
        raise GatewayConfigError(
            "refusing to start: the receipt key is a public anvil dev key and this gateway sells off "
            "the local chain; anyone could sign receipts in its name. Use a key of your own.",
            code="dev_key_on_public_chain",
        )
    try:
        return ReceiptSigner.from_key(key)
    except (ValueError, TypeError):
        raise GatewayConfigError("X402GW_RECEIPT_KEY is not a private key (32 bytes in hex)",
                                 code="receipt_key_invalid") from None


_MESSAGE = "x402gw receipt request\ngateway: {signer}\npayment: {payment_id}\ntime: {timestamp}"


def challenge_message(signer: str, payment_id: int | str, timestamp: int | str) -> str:
    """What the payer signs (EIP-191 personal_sign) to fetch one receipt from this gateway."""
    return _MESSAGE.format(signer=signer, payment_id=payment_id, timestamp=timestamp)


class ReceiptEndpoint:
    def __init__(
        self, signer: ReceiptSigner | None, ledger: Ledger, store: StateStore, public_url: str | None = None,
        clock: Callable[[], float] = time.time, evidence: SettlementEvidence | None = None,
    ) -> None:
        self.signer = signer
        self.evidence = evidence  # None: the row alone (a test's endpoint); the app always gives one
        self.ledger = ledger
        self.store = store
        self.public_url = public_url.rstrip("/") if public_url else None
        self.clock = clock

    def routes(self) -> list[Route]:
        async def receipt(request: Request) -> Response:
            try:
                return await self.receipt(request)
            except GatewayError as err:
                return err.to_response()

        return [Route("/receipts/{payment_id}", receipt, methods=["GET"])]

    async def receipt(self, request: Request) -> Response:
        if self.signer is None:
            raise GatewayError(codes.RECEIPTS_DISABLED, "this gateway signs no receipts (no receipt key)")
        raw_id = request.path_params["payment_id"]
        if _TX_HASH.fullmatch(raw_id):
            return await self._by_transaction(request, self.signer, raw_id)
        if not _PAYMENT_ID.fullmatch(raw_id):
            raise GatewayError(codes.RECEIPT_NOT_FOUND, "no receipt of yours has this payment id")
        payment_id = int(raw_id)
        wallet, timestamp = await self._authenticate(request, self.signer.address, payment_id)
        row = await self.ledger.run(self.ledger.get, payment_id)
        if row is None or row.payer.lower() != wallet.lower():
            raise GatewayError(codes.RECEIPT_NOT_FOUND, "no receipt of yours has this payment id")
        # Keyed on the id as signed (12), not as spelled in the path (012): one signed request, once.
        await self._once(wallet, str(payment_id), timestamp)
        if row.state != PaymentState.SETTLED or not row.tx_hash:
            raise GatewayError(codes.RECEIPT_NOT_SETTLED, f"this payment is {row.state}: only a settled payment has a receipt",
                               paymentId=row.id)
        if row.refund_owed is not None:  # the answer it paid for never came: a receipt would attest a charge reversed
            raise GatewayError(codes.RECEIPT_REFUNDED, "this payment's charge is owed back (or paid back): it has no receipt",
                               paymentId=row.id, refund="refunded" if row.refunded_at else "owed", refundAmount=str(row.refund_owed))
        if not await self._confirmed(row):
            raise GatewayError(codes.RECEIPT_UNCONFIRMED, "the audit trail and the chain do not both bear out this "
                               "payment's settlement: it has no receipt", paymentId=row.id)
        return JSONResponse(self.signer.receipt(row, self.public_url), headers={CACHE_CONTROL: "private, no-store"})

    async def _confirmed(self, row: Payment) -> bool:
        if self.evidence is None:
            return True
        try:
            return await self.evidence.confirmed(row)
        except ChainUnavailable:
            raise GatewayError(codes.RECEIPT_UNAVAILABLE, "the chain cannot be read to confirm this payment; retry later",
                               retryAfter=2) from None

    async def _by_transaction(self, request: Request, signer: ReceiptSigner, transaction: str) -> Response:
        """``GET /receipts/0x<tx hash>``: the signer's settled payments in that transaction (a batch
        may hold several), as ``{"receipts": [...]}``; none: 404, as for another wallet's."""
        wallet, timestamp = await self._authenticate(request, signer.address, transaction)
        rows = await self.ledger.run(lambda: list(settled_payments(self.ledger, payers=[wallet], transaction=transaction)))
        if not rows:
            raise GatewayError(codes.RECEIPT_NOT_FOUND, "no receipt of yours has this transaction")
        # Before the evidence: a replayed request must not cost a writer flush and an RPC call each time.
        await self._once(wallet, transaction.lower(), timestamp)
        rows = [row for row in rows if row.refund_owed is None]  # a charge owed back has no receipt
        rows = [row for row in rows if await self._confirmed(row)]  # nor one nothing bears out
        if not rows:
            raise GatewayError(codes.RECEIPT_NOT_FOUND, "no receipt of yours has this transaction")
        receipts = [signer.receipt(row, self.public_url) for row in rows]
        return JSONResponse({"receipts": receipts}, headers={CACHE_CONTROL: "private, no-store"})

    async def _authenticate(self, request: Request, signer: str, payment_id: int | str) -> tuple[str, int]:
        """The wallet that signed this request's challenge within the skew, and the time it signed."""
        raw_time = request.headers.get(X402GW_RECEIPT_TIME, "")
        signature = request.headers.get(X402GW_RECEIPT_SIGNATURE, "")
        if not is_digits(raw_time, 12) or len(signature) != 132 or not signature.startswith("0x"):
            raise GatewayError(
                codes.RECEIPT_AUTH_INVALID,
                f"sign messageTemplate (time: the current unix seconds) with the payer's wallet (personal_sign) "
                f"and send {X402GW_RECEIPT_TIME} and {X402GW_RECEIPT_SIGNATURE}",
                messageTemplate=challenge_message(signer, payment_id, "{unixSeconds}"),
            )
        timestamp = int(raw_time)
        if abs(self.clock() - timestamp) > MAX_SKEW_SECONDS:
            raise GatewayError(codes.RECEIPT_AUTH_EXPIRED,
                               f"{X402GW_RECEIPT_TIME} must be within {MAX_SKEW_SECONDS} s of now; sign again",
                               maxSkewSeconds=MAX_SKEW_SECONDS)
        try:
            wallet = str(Account.recover_message(encode_defunct(text=challenge_message(signer, payment_id, timestamp)),
                                                 signature=signature))
        except Exception:  # noqa: BLE001 - eth-keys raises several types for a bad signature; all mean invalid
            raise GatewayError(codes.RECEIPT_AUTH_INVALID, "the signature recovers to no wallet") from None
        return wallet, timestamp

    async def _once(self, wallet: str, reference: str, timestamp: int) -> None:
        """Each signed message once, keyed on what was signed (a re-encoded signature is the same
        message); kept until its time is out of the window."""
        digest = hashlib.sha256(f"{wallet.lower()}\n{reference}\n{timestamp}".encode()).hexdigest()
        fresh = await self.store.put(f"receipt-auth:{digest}", b"1", ttl_ms=2 * MAX_SKEW_SECONDS * 1000 + 1000,
                                     only_if_absent=True)
        if not fresh:
            raise GatewayError(codes.RECEIPT_AUTH_REPLAYED, "this signed request was already used; sign a new one")


def receipts_discovery(signer: ReceiptSigner | None, base: str) -> dict[str, object] | None:
    """What /.well-known/x402 says about receipts: who signs them, and how to fetch one."""
    if signer is None:
        return None
    return {
        "signer": signer.address,
        "format": RECEIPT_FORMAT,
        "domain": {"name": RECEIPT_DOMAIN_NAME, "version": RECEIPT_DOMAIN_VERSION},
        "header": X402GW_RECEIPT,
        "retrieve": base + "/receipts/{paymentId}",
        "retrieveByTransaction": base + "/receipts/{transaction}",
        "auth": {
            "scheme": "eip191",
            "headers": [X402GW_RECEIPT_TIME, X402GW_RECEIPT_SIGNATURE],
            "maxSkewSeconds": MAX_SKEW_SECONDS,
            "message": challenge_message(signer.address, "{paymentId or transaction}", "{unixSeconds}"),
        },
    }
