"""Safety, part one: a payment is settled at most once, across requests, retries, crashes and replicas.

* An in-flight lock in the shared store on (network, payer, nonce), and on the client's
  ``payment-identifier`` when it sends one, from verify until the outcome is final: a second
  request with the same payment meanwhile gets 409 ``payment_in_flight``.
* A payment the ledger already knows is *resumed*, not re-run, but only when the request presents
  that very signed payload (``same_payment``: every authorization field equal, the signature
  already recovered to its payer) for that very request (tool and fingerprint of method, path,
  query and body). A settled one replays the answer it bought (or, if that answer was never
  stored, the pipeline says so and records the refund an ``upfront`` call is owed); an open one
  (``settling``/``pending``) is first resolved against the chain. Anything else that names a
  known payer and nonce (both public on chain) is a fresh payment, verified as one.
* ``payment-identifier`` (x402 extension): bound to a fingerprint of the request and to the
  payment; the same id with another request or payment is a 409.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from gateway.errors import GatewayError
from gateway.protocol.offers import PAYMENT_IDENTIFIER
from gateway.store import StateStore, StoreUnavailable
from settlement.chain.client import Chain
from settlement.errors import ChainUnavailable
from settlement.ledger.payments import Ledger, Payment, PaymentState
from settlement.ledger.resolve import apply, resolve_payment
from settlement.schemes.signatures import same_authorization
from settlement.x402.wire import ExactEvmPayload, PaymentPayload, PaymentRequirements, SettleResponse

_IDENTIFIER = re.compile(r"[A-Za-z0-9_-]{16,128}")


def payment_identifier(payload: PaymentPayload) -> str | None:
    extension = (payload.extensions or {}).get(PAYMENT_IDENTIFIER)
    if extension is None:
        return None
    info = extension.get("info") if isinstance(extension, dict) else None
    identifier = info.get("id") if isinstance(info, dict) else None
    if identifier is None:
        return None
    if not isinstance(identifier, str) or not _IDENTIFIER.fullmatch(identifier):
        raise GatewayError(
            "invalid_payment_identifier",
            "payment-identifier id must be 16-128 characters of A-Z, a-z, 0-9, '_' and '-'",
        )
    return identifier


def request_fingerprint(method: str, path: str, query: str, body: bytes) -> str:
    verb = "GET" if method == "HEAD" else method
    digest = hashlib.sha256(body).hexdigest()
    return hashlib.sha256(f"{verb}\n{path}\n{query}\n{digest}".encode()).hexdigest()


def same_payment(
    row: Payment, requirements: PaymentRequirements, presented: ExactEvmPayload, tool: str, fingerprint: str
) -> bool:
    """Whether ``presented`` (whose signature already recovered to its ``from`` over this offer) is
    the payment ``row`` recorded, for the same request: same token and network, same tool and
    request fingerprint, and every field of the signed authorization equal."""
    if row.network != requirements.network or row.asset.lower() != requirements.asset.lower():
        return False
    if row.tool != tool or row.fingerprint != fingerprint or not row.authorization:
        return False
    try:
        stored = ExactEvmPayload.model_validate(json.loads(row.authorization))
    except ValueError:  # pydantic's ValidationError and json's JSONDecodeError are ValueErrors
        return False
    return same_authorization(stored, presented)


@asynccontextmanager
async def in_flight(store: StateStore, keys: list[str], owner: str, ttl_ms: int) -> AsyncIterator[None]:
    """Hold every key for the request, or refuse with 409 if another request holds one."""
    held: list[str] = []
    try:
        for key in keys:
            if not await store.acquire(key, owner, ttl_ms):
                raise GatewayError(
                    "payment_in_flight",
                    "this payment is being processed by another request; resend it when that one has answered",
                    retryAfter=1,
                )
            held.append(key)
        yield
    except StoreUnavailable:
        raise GatewayError("store_unavailable", "the gateway's shared state is unavailable; retry later",
                           status=503, retryAfter=2) from None
    finally:
        for key in reversed(held):
            try:
                await store.release(key, owner)
            except StoreUnavailable:
                pass  # the lock expires on its own


def receipt_of(row: Payment) -> SettleResponse:
    return SettleResponse(
        success=True, transaction=row.tx_hash or "", network=row.network, payer=row.payer, amount=str(row.amount),
        extra={"blockNumber": row.block_number} if row.block_number is not None else None,
    )


class Resumed:
    """What a known payment turned out to be: a stored answer to replay, or nothing (run it fresh)."""

    def __init__(self, row: Payment, answer: tuple[int, list[tuple[str, str]], bytes] | None) -> None:
        self.row = row
        self.answer = answer


async def resume(
    row: Payment, ledger: Ledger, chain: Chain | None, *, write_ahead: bool
) -> Resumed | None:
    """Resume a payment the ledger knows. Returns the settled payment with its stored answer to
    replay (``answer`` is None when none was stored), ``None`` when the payment moved no money and
    may run again, or raises the refusal that names what happened."""
    if row.state in (PaymentState.SETTLING, PaymentState.PENDING):
        if chain is None:
            raise _open_refusal(row)
        try:
            resolution = await resolve_payment(row, chain, write_ahead=write_ahead)
        except ChainUnavailable:
            raise _open_refusal(row) from None
        if resolution.after != row.state or resolution.tx_hash != row.tx_hash:
            await ledger.run(apply, ledger, resolution)
        refreshed = await ledger.run(ledger.get, row.id)
        assert refreshed is not None
        row = refreshed
    if row.state == PaymentState.SETTLED:
        answer = await ledger.run(ledger.stored_response, row.id)
        return Resumed(row, answer)
    if row.state in (PaymentState.SETTLING, PaymentState.PENDING):
        raise _open_refusal(row)
    return None  # verified / voided / failed: nothing moved; the caller runs it (the row is reused)


def _open_refusal(row: Payment) -> GatewayError:
    fields: dict[str, Any] = {"paymentId": row.id, "retryAfter": 5}
    if row.tx_hash:
        fields["transaction"] = row.tx_hash
        return GatewayError(
            "settlement_pending",
            "this payment's settlement is not final yet; the content is held; resend the same payment later",
            status=503, **fields,
        )
    return GatewayError(
        "settlement_unknown",
        "this payment's settlement outcome is not known yet; resend the same payment later",
        status=503, **fields,
    )
