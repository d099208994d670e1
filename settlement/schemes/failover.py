"""Several remote facilitators for one network, tried in order, never settling one payment twice.

The rule (README, "Production facilitators and RPC"):

* ``/verify`` moves money nowhere, so any failure to get a usable answer (unreachable, timeout,
  broken body, refused credentials) moves to the next facilitator. A definite answer (valid or
  not) is final: a refusal is never shopped around.
* ``/settle`` moves to the next facilitator only when the request provably never left: the
  connection to the facilitator could not be made (``SettleNotSent``). Any other failure (a
  timeout, a reset after the request was written, a 5xx, an unusable body, refused credentials)
  means the facilitator may have broadcast the transfer: the outcome is unknown and stays with
  that facilitator, resolved from the chain like every unknown outcome (503 ``settlement_unknown``,
  the start-up reconcile, ``x402gw reconcile``). Asking a second facilitator then would race
  the first over one authorization: the chain lets only one transfer through (EIP-3009 nonces),
  but the second's answer ("nonce already used", or a success whose transaction then reverts)
  could turn a payment the first did settle into a 402 (a charge without its answer) or a ledger
  row naming the wrong transaction.
* When no facilitator could even be reached, ``settle`` raises ``FacilitatorUnavailable``:
  nothing was sent anywhere, so nothing was charged (the gateway answers 503
  ``settlement_unavailable``); when every verify fails, the same (503 ``facilitator_unavailable``,
  before anything is recorded). Fail closed either way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from settlement.errors import FacilitatorUnavailable
from settlement.schemes.remote import RemoteFacilitator, SettleNotSent
from settlement.x402.wire import PaymentPayload, PaymentRequirements, SettleResponse, VerifyResponse

__all__ = ["FailoverFacilitator"]

log = logging.getLogger("x402gw.facilitator")


class FailoverFacilitator:
    """``facilitators``, in order, as one facilitator (the ``Facilitator`` protocol, plus what the
    gateway reads from a remote one: ``url``, timeouts, ``fetch_supported``, ``close``)."""

    def __init__(self, facilitators: Sequence[RemoteFacilitator]) -> None:
        if not facilitators:
            raise ValueError("a failover needs at least one facilitator")
        self.facilitators = list(facilitators)
        # Redacted (scheme and host): the name used in messages.
        self.url = self.label = ", ".join(f.label for f in self.facilitators)
        # Upper bounds for the in-flight lock: every facilitator may be tried once per call.
        self.verify_timeout_seconds = sum(f.verify_timeout_seconds for f in self.facilitators)
        self.settle_timeout_seconds = sum(f.settle_timeout_seconds for f in self.facilitators)

    def health(self) -> list[dict[str, str | None]]:
        """Each facilitator's state (``unknown``, ``up``, ``down``) and last error, in order."""
        return [f.health() for f in self.facilitators]

    def supported(self) -> dict[str, Any]:
        """Every facilitator's last ``/supported``, merged (kinds, extensions, signers)."""
        kinds: list[Any] = []
        extensions: list[Any] = []
        signers: dict[str, list[Any]] = {}
        for facilitator in self.facilitators:
            answer = facilitator.supported()
            kinds.extend(k for k in answer.get("kinds", []) if k not in kinds)
            extensions.extend(e for e in answer.get("extensions", []) or [] if e not in extensions)
            for family, addresses in (answer.get("signers") or {}).items():
                merged = signers.setdefault(family, [])
                merged.extend(a for a in addresses if a not in merged)
        return {"kinds": kinds, "extensions": extensions, "signers": signers}

    async def fetch_supported(self) -> dict[str, Any]:
        """Asks every facilitator (each one's health is refreshed); fails only when none answers."""
        answered = 0
        for facilitator in self.facilitators:
            try:
                await facilitator.fetch_supported()
                answered += 1
            except FacilitatorUnavailable:
                continue
        if not answered:
            raise FacilitatorUnavailable("no facilitator answered /supported")
        return self.supported()

    async def verify(self, payload: PaymentPayload, requirements: PaymentRequirements) -> VerifyResponse:
        for index, facilitator in enumerate(self.facilitators):
            try:
                return await facilitator.verify(payload, requirements)
            except FacilitatorUnavailable as exc:
                if index + 1 < len(self.facilitators):
                    log.warning("facilitator %s: verify failed (%s); trying the next", facilitator.label, exc.message)
        raise FacilitatorUnavailable(f"none of {len(self.facilitators)} facilitators answered verify")

    async def settle(
        self, payload: PaymentPayload, requirements: PaymentRequirements, *, before_send: Any = None
    ) -> SettleResponse:
        for index, facilitator in enumerate(self.facilitators):
            try:
                # Whatever this returns (settled, refused, unknown) is the outcome: never asked again elsewhere.
                return await facilitator.settle_attempt(payload, requirements)
            except SettleNotSent:
                if index + 1 < len(self.facilitators):
                    log.warning("facilitator %s: settle not sent (no connection); trying the next", facilitator.label)
        raise FacilitatorUnavailable(f"none of {len(self.facilitators)} facilitators could be reached; nothing was sent")

    async def close(self) -> None:
        for facilitator in self.facilitators:
            await facilitator.close()
