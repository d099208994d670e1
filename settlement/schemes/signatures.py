"""Who signed an exact-EVM payment, decided offline, before anything trusts its claimed fields.

A payment's ``from`` and ``nonce`` are public once it settles (calldata, ``AuthorizationUsed``),
so a header naming them proves nothing. ``SignerCheck.signer`` recovers the EIP-3009 signature
over the gateway's *own* offer (its token domain, never the caller's ``extra``) and answers the
payer only when the signature recovers to ``from``. It costs one keccak pair and one secp256k1
recovery and no I/O, so a junk signature is refused before any lookup, lock, rate-limit token or
RPC is spent on it.
"""

from __future__ import annotations

from settlement.chain.addresses import checksum_address
from settlement.schemes.eip712 import TransferAuthorization, authorization_digest, domain_separator, recover_signer
from settlement.x402.wire import ExactEvmPayload, PaymentRequirements

__all__ = ["SignerCheck", "authorization_of", "same_authorization"]


def authorization_of(exact: ExactEvmPayload) -> TransferAuthorization:
    """The wire authorization in integers and bytes (the codec already checked its formats)."""
    a = exact.authorization
    return TransferAuthorization(
        from_=checksum_address(a.from_),
        to=checksum_address(a.to),
        value=int(a.value),
        valid_after=int(a.valid_after),
        valid_before=int(a.valid_before),
        nonce=bytes.fromhex(a.nonce[2:]),
    )


def same_authorization(stored: ExactEvmPayload, presented: ExactEvmPayload) -> bool:
    """Whether two payloads carry the same signed message (every authorization field, compared as
    values: address case and number spelling do not matter)."""
    return authorization_of(stored) == authorization_of(presented)


class SignerCheck:
    """Offline signature recovery over the gateway's own offers. Domain separators are cached per
    (network, token, name, version) of an offer the gateway made, so the cache is bounded by the
    catalog, never by what callers send."""

    def __init__(self) -> None:
        self._domains: dict[tuple[str, str, str, str], bytes] = {}

    def signer(self, requirements: PaymentRequirements, exact: ExactEvmPayload) -> str | None:
        """The checksummed payer when the signature recovers to ``authorization.from`` under this
        offer's token domain; ``None`` for any other signature (junk, another domain, malleable)."""
        domain = self._domain(requirements)
        if domain is None:
            return None
        try:
            auth = authorization_of(exact)
            signature = bytes.fromhex(exact.signature[2:])
        except ValueError:
            return None
        signer = recover_signer(authorization_digest(domain, auth), signature)
        return signer if signer is not None and signer == auth.from_ else None

    def digest(self, requirements: PaymentRequirements, exact: ExactEvmPayload) -> bytes | None:
        """The EIP-712 digest the payer signed under this offer's token domain (what a contract
        wallet's ``isValidSignature`` is asked about), or None for a payload that has none."""
        domain = self._domain(requirements)
        if domain is None:
            return None
        try:
            return authorization_digest(domain, authorization_of(exact))
        except ValueError:
            return None

    def _domain(self, requirements: PaymentRequirements) -> bytes | None:
        extra = requirements.extra or {}
        name, version = extra.get("name"), extra.get("version")
        prefix, _, ident = requirements.network.partition(":")
        if prefix != "eip155" or not (ident.isascii() and ident.isdigit()):
            return None
        if not isinstance(name, str) or not isinstance(version, str):
            return None
        key = (requirements.network, requirements.asset.lower(), name, version)
        domain = self._domains.get(key)
        if domain is None:
            domain = domain_separator(name, version, int(ident), checksum_address(requirements.asset))
            self._domains[key] = domain
        return domain
