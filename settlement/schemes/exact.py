"""The ``exact`` scheme on EVM networks (EIP-3009 ``transferWithAuthorization``), as a ``Scheme``.

One ``ExactEvm`` per facilitator that settles it: the local one (``exact_local``), the batching
one (``batch``) or a remote one (``remote``), each on the networks it was configured for. The
requirements are the same whoever settles; whether the transaction hash is written ahead of the
broadcast is the facilitator's (the local and batching ones call ``before_send``, a remote one
cannot), and an open payment is resolved against a read-only chain client when there is one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Set

from catalog import PaymentTerms
from settlement.chain.client import BeforeSend, Chain
from settlement.errors import FacilitatorUnavailable
from settlement.ledger import Payment
from settlement.ledger.resolve import Resolution
from settlement.schemes.base import Facilitator, Supported
from settlement.schemes.exact_permit2_payload import moved_by_permit2
from settlement.schemes.exact_resolve import resolve_exact
from settlement.schemes.remote_confirm import confirm_settlement
from settlement.x402.wire import PaymentPayload, PaymentRequirements, SettleResponse, VerifyResponse

EXACT = "exact"


def exact_requirements(terms: PaymentTerms, amount: int) -> PaymentRequirements:
    """An exact offer: this amount of this EIP-3009 token to ``pay_to``; ``extra`` names the
    token's EIP-712 domain, which the payer signs over."""
    return PaymentRequirements(
        scheme=EXACT,
        network=terms.network,
        amount=str(amount),
        asset=terms.asset,
        pay_to=terms.pay_to,
        max_timeout_seconds=terms.max_timeout_seconds,
        extra={"name": terms.asset_name, "version": terms.asset_version},
    )


class ExactEvm:
    """``exact`` through ``facilitator`` on ``networks`` (None: any network, for a facilitator
    handed in whole, as tests and embedders do). ``chains``: read access used to resolve open
    payments; ``writes_ahead``: the facilitator calls ``before_send`` before it broadcasts;
    ``confirms``: a remote facilitator, whose settle answers are held to the chain
    (``remote_confirm``)."""

    name = EXACT

    def __init__(
        self,
        facilitator: Facilitator | None,
        networks: Iterable[str] | None = None,
        *,
        chains: Mapping[str, Chain] | None = None,
        writes_ahead: bool = False,
        confirms: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.facilitator = facilitator
        self._confirms = confirms
        self.networks = None if networks is None else frozenset(networks)
        self._chains = dict(chains or {})
        self._writes_ahead = writes_ahead
        self._clock = clock

    def serves(self, network: str) -> bool:
        return self.networks is None or network in self.networks

    def requirements(self, terms: PaymentTerms, amount: int) -> PaymentRequirements:
        return exact_requirements(terms, amount)

    def _facilitator(self) -> Facilitator:
        if self.facilitator is None:  # a resolution-only scheme (``x402gw reconcile``)
            raise FacilitatorUnavailable("this exact scheme only resolves payments", code="network_not_served")
        return self.facilitator

    async def verify(self, payload: PaymentPayload, requirements: PaymentRequirements) -> VerifyResponse:
        return await self._facilitator().verify(payload, requirements)

    async def settle(
        self, payload: PaymentPayload, requirements: PaymentRequirements, *, before_send: BeforeSend | None = None
    ) -> SettleResponse:
        result = await self._facilitator().settle(payload, requirements, before_send=before_send)
        if not self._confirms:
            return result  # ours (local, batching: it read its own receipt), or a facilitator handed in whole
        # A remote facilitator's answer, held to the chain where this gateway reads it.
        return await confirm_settlement(self._chains.get(requirements.network), payload, requirements, result)

    def writes_ahead(self, network: str) -> bool:
        return self._writes_ahead and self.serves(network)

    async def resolve(self, row: Payment) -> Resolution | None:
        chain = self._chains.get(row.network)
        if chain is None or moved_by_permit2(row):  # a Permit2 row is not an EIP-3009 one (exact_permit2)
            return None
        return await resolve_exact(row, chain, write_ahead=self.writes_ahead(row.network), clock=self._clock)

    def describe(self) -> Supported:
        if self.facilitator is None:
            return {"kinds": [], "extensions": [], "signers": {}}
        supported = self.facilitator.supported()
        kinds = [
            kind for kind in supported.get("kinds", [])
            if kind.get("scheme") == EXACT and self.serves(str(kind.get("network")))
        ]
        return {**supported, "kinds": kinds}


def exact_resolvers(chains: Mapping[str, Chain], write_ahead: Set[str]) -> list[ExactEvm]:
    """Resolution-only exact schemes for ``x402gw reconcile``: on ``write_ahead``'s networks the
    facilitator wrote the transaction hash ahead (an open row without one was never broadcast);
    on every other network with a chain, it may have been."""
    return [
        ExactEvm(None, write_ahead, chains=chains, writes_ahead=True),
        ExactEvm(None, None, chains=chains, writes_ahead=False),
    ]
