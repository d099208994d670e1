"""The scheme seam: what the gateway needs from an x402 payment scheme, and nothing more.

Two shapes, one inside the other:

* ``Facilitator`` is the x402 facilitator API (``/supported``, ``/verify``, ``/settle``) as a
  Protocol: the local EIP-3009 facilitator, a remote one over HTTP and the batching one all have
  it. It knows payloads and requirements, not catalogs or ledgers.
* ``Scheme`` is one payment scheme on the networks it serves, as the gateway sees it: it turns a
  tool's terms into the requirements of its offer, verifies and settles through whatever
  facilitator it wraps, says whether that facilitator writes the transaction hash ahead of the
  broadcast, resolves a payment whose outcome is unknown, and describes itself for ``/supported``
  and discovery. The registry (``settlement.schemes.registry.Schemes``) holds the schemes by name
  and network; the pipeline, the facilitator API, reconcile and discovery know schemes only
  through it.

The shapes follow the x402 SDK's ``SchemeNetworkServer`` (``requirements`` ≈ ``parse_price`` +
``enhance_payment_requirements``) and ``SchemeNetworkFacilitator`` (``verify``, ``settle``,
``describe`` ≈ ``get_extra`` / ``get_signers``), so an SDK mechanism can be adapted behind it.
Expected payment failures are values (``VerifyResponse(is_valid=False)``, ``SettleResponse(
success=False)``); ``ChainUnavailable`` / ``FacilitatorUnavailable`` mean broken infrastructure.
"""

from __future__ import annotations

from typing import Any, Protocol

from catalog import PaymentTerms
from settlement.chain.client import BeforeSend
from settlement.ledger import Payment
from settlement.ledger.resolve import Resolution
from settlement.x402.wire import PaymentPayload, PaymentRequirements, SettleResponse, VerifyResponse

# What ``/supported`` answers: {"kinds": [{"x402Version", "scheme", "network", "extra"?}],
# "extensions": [...], "signers": {"eip155:*": [...]}}.
Supported = dict[str, Any]


class Facilitator(Protocol):
    """The x402 facilitator API, in process."""

    def supported(self) -> Supported: ...

    async def verify(self, payload: PaymentPayload, requirements: PaymentRequirements) -> VerifyResponse: ...

    async def settle(
        self, payload: PaymentPayload, requirements: PaymentRequirements, *, before_send: BeforeSend | None = None
    ) -> SettleResponse:
        """``before_send`` is called with the transaction hash before it is broadcast, by
        facilitators that know it (the local one); remote facilitators never call it."""
        ...


class Scheme(Protocol):
    """One x402 scheme on the networks it serves. Adding a scheme is adding one of these (a module)
    and naming it in the catalog (``payment.scheme``); no stage changes."""

    @property
    def name(self) -> str:
        """The x402 scheme name (``requirements.scheme``), e.g. ``exact``."""
        ...

    def serves(self, network: str) -> bool:
        """Whether this scheme settles on ``network`` (CAIP-2)."""
        ...

    def requirements(self, terms: PaymentTerms, amount: int) -> PaymentRequirements:
        """The payment requirements of an offer at ``amount`` atomic units on ``terms``, without
        any per-request part (the gateway adds the request binding to ``extra``)."""
        ...

    async def verify(self, payload: PaymentPayload, requirements: PaymentRequirements) -> VerifyResponse: ...

    async def settle(
        self, payload: PaymentPayload, requirements: PaymentRequirements, *, before_send: BeforeSend | None = None
    ) -> SettleResponse: ...

    def writes_ahead(self, network: str) -> bool:
        """True when ``settle`` calls ``before_send`` before anything is broadcast on ``network``:
        then an open payment without a transaction hash was never broadcast by us."""
        ...

    async def resolve(self, row: Payment) -> Resolution | None:
        """What happened to an open (``settling`` / ``pending``) payment of this scheme, or None
        when this scheme cannot tell (no chain access for its network). The ledger is not touched;
        ``ChainUnavailable`` when the chain does not answer."""
        ...

    def describe(self) -> Supported:
        """The kinds (scheme, network, extra), extensions and signers this scheme offers."""
        ...
