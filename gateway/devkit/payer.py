"""The paying side of the exact-EVM scheme: sign an EIP-3009 authorization for an offer.

Used by the reference agent, the demo, the tests and the benchmarks. Signs with coincurve over
the same EIP-712 digest the facilitator checks (low-s, v = 27/28).
"""

from __future__ import annotations

import os
import time
from typing import Any

from coincurve import PrivateKey
from eth_account import Account

from settlement.schemes.eip712 import TransferAuthorization, authorization_digest, domain_separator
from settlement.x402.wire import X402_VERSION, PaymentPayload, PaymentRequirements, ResourceInfo


class Payer:
    def __init__(self, private_key: str) -> None:
        self._key = PrivateKey(bytes.fromhex(private_key.removeprefix("0x")))
        self.address: str = Account.from_key(private_key).address

    def sign(
        self,
        requirements: PaymentRequirements,
        *,
        resource: ResourceInfo | None = None,
        now: int | None = None,
        nonce: bytes | None = None,
        valid_after: int = 0,
        valid_before: int | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> PaymentPayload:
        """A v2 payment payload for ``requirements``. ``overrides`` replaces authorization fields
        after signing-time values are chosen (tests use it to build wrong payments)."""
        now = int(time.time()) if now is None else now
        extra = requirements.extra or {}
        chain_id = int(requirements.network.split(":", 1)[1])
        fields: dict[str, Any] = {
            "from_": self.address,
            "to": requirements.pay_to,
            "value": int(requirements.amount),
            "valid_after": valid_after,
            "valid_before": valid_before if valid_before is not None else now + requirements.max_timeout_seconds,
            "nonce": nonce if nonce is not None else os.urandom(32),
        }
        fields.update(overrides or {})
        auth = TransferAuthorization(**fields)
        domain = domain_separator(str(extra["name"]), str(extra["version"]), chain_id, requirements.asset)
        recoverable = self._key.sign_recoverable(authorization_digest(domain, auth), hasher=None)
        signature = recoverable[:64] + bytes([recoverable[64] + 27])
        return PaymentPayload(
            x402_version=X402_VERSION,
            resource=resource,
            accepted=requirements,
            payload={
                "signature": "0x" + signature.hex(),
                "authorization": {
                    "from": auth.from_,
                    "to": auth.to,
                    "value": str(auth.value),
                    "validAfter": str(auth.valid_after),
                    "validBefore": str(auth.valid_before),
                    "nonce": "0x" + auth.nonce.hex(),
                },
            },
        )
