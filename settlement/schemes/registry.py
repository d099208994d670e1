"""``Schemes``: the registry of the schemes this gateway offers, by scheme name and network.

The one object the pipeline, the facilitator API, reconcile and discovery hold. It routes a
verify or settle to the scheme named by the requirements (``scheme``, ``network``), builds an
offer's requirements from a tool's terms, resolves open payments, and merges the schemes'
descriptions into one ``/supported`` answer. Lookups are by (name, network); the first
registered scheme that serves the pair wins.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from catalog import PaymentTerms, Tool
from settlement.chain.client import BeforeSend
from settlement.errors import FacilitatorUnavailable
from settlement.ledger import Payment
from settlement.ledger.resolve import Resolution
from settlement.schemes.base import Scheme, Supported
from settlement.schemes.upto import upto_maximum
from settlement.x402.wire import PaymentPayload, PaymentRequirements, SettleResponse, VerifyResponse


class Schemes:
    def __init__(self, schemes: Iterable[Scheme] = ()) -> None:
        self._schemes: list[Scheme] = list(schemes)
        self._found: dict[tuple[str, str], Scheme | None] = {}

    def register(self, scheme: Scheme) -> None:
        self._schemes.append(scheme)
        self._found.clear()

    def __iter__(self) -> Iterator[Scheme]:
        return iter(self._schemes)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(scheme.name for scheme in self._schemes)

    def get(self, name: str, network: str) -> Scheme | None:
        key = (name, network)
        if key not in self._found:
            self._found[key] = next((s for s in self._schemes if s.name == name and s.serves(network)), None)
        return self._found[key]

    def for_requirements(self, requirements: PaymentRequirements) -> Scheme:
        scheme = self.get(requirements.scheme, requirements.network)
        if scheme is None:
            raise FacilitatorUnavailable(
                f"no {requirements.scheme} scheme serves {requirements.network}", code="network_not_served"
            )
        return scheme

    def unserved(self, tools: Iterable[Tool]) -> list[str]:
        """What the catalog asks for that no registered scheme serves, one line per (scheme, network)."""
        missing = sorted(
            {(o.terms.scheme, o.terms.network) for t in tools for o in t.offers if self.get(o.terms.scheme, o.terms.network) is None}
        )
        known = ", ".join(sorted(self.names)) or "none"
        return [f"scheme {name!r} on {network} is not served (registered schemes: {known})" for name, network in missing]

    def requirements(self, terms: PaymentTerms, amount: int) -> PaymentRequirements:
        scheme = self.get(terms.scheme, terms.network)
        if scheme is None:
            raise FacilitatorUnavailable(f"no {terms.scheme} scheme serves {terms.network}", code="network_not_served")
        return scheme.requirements(terms, amount)

    def writes_ahead(self, requirements: PaymentRequirements) -> bool:
        scheme = self.get(requirements.scheme, requirements.network)
        return scheme is not None and scheme.writes_ahead(requirements.network)

    async def verify(self, payload: PaymentPayload, requirements: PaymentRequirements) -> VerifyResponse:
        return await self.for_requirements(requirements).verify(payload, requirements)

    async def settle(
        self, payload: PaymentPayload, requirements: PaymentRequirements, *, before_send: BeforeSend | None = None
    ) -> SettleResponse:
        return await self.for_requirements(requirements).settle(payload, requirements, before_send=before_send)

    async def resolve(self, row: Payment) -> Resolution | None:
        """What happened to an open payment, from the first scheme of its kind on its network that
        can tell (the ledger records no scheme: an upto row's authorization is an upto Permit2 one,
        and only an upto scheme reads it; any other row goes to the other schemes)."""
        upto = upto_maximum(row) is not None
        channel = '"channelConfig"' in row.authorization  # a batch-settlement row: only that scheme reads it
        for scheme in self._schemes:
            if (scheme.name == "upto") == upto and (scheme.name == "batch-settlement") == channel and scheme.serves(row.network):
                resolution = await scheme.resolve(row)
                if resolution is not None:
                    return resolution
        return None

    def supported(self) -> Supported:
        """Every scheme's kinds, in registration order; extensions and signers merged."""
        kinds: list[dict[str, Any]] = []
        extensions: list[Any] = []
        signers: dict[str, list[str]] = {}
        for scheme in self._schemes:
            described = scheme.describe()
            kinds.extend(k for k in described.get("kinds", []) if k not in kinds)
            extensions.extend(e for e in described.get("extensions", []) if e not in extensions)
            for family, addresses in (described.get("signers") or {}).items():
                merged = signers.setdefault(family, [])
                merged.extend(a for a in addresses if a not in merged)
        return {"kinds": kinds, "extensions": extensions, "signers": signers}
