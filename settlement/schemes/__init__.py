"""x402 payment schemes behind one seam (``Scheme``), held by one registry (``Schemes``).

    base.py           the Facilitator and Scheme protocols
    registry.py       Schemes: by scheme name and network; what the gateway holds
    exact.py          ExactEvm: the exact scheme (EIP-3009) through any facilitator
    exact_local.py    LocalFacilitator: verifies and settles exact payments in process
    exact_resolve.py  an open exact payment's outcome, read from the chain
    batch.py          BatchingFacilitator: exact payments settled many to a transaction
    remote.py         RemoteFacilitator: a facilitator over HTTP
    failover.py       FailoverFacilitator: several remote ones in order, one settlement at most
    facilitator_auth.py   credentials for remote facilitators: static headers, CDP JWTs
    eip712.py, signatures.py   EIP-712 digests and offline signer recovery
    wallets.py        contract-wallet signatures (ERC-1271, ERC-6492): checked on chain, settled
    upto.py           UptoEvm: the upto scheme (Permit2 witness transfer up to a signed maximum)
    upto_permit.py    an upto payment's Permit2 authorization: parsed, hashed, encoded
    channels.py       ChannelsEvm: the batch-settlement scheme (a deposit, a cumulative voucher per call)
    channels_contract.py   a channel payment parsed, the escrow's calls encoded
    channels_policy.py     its names, policy, and what it needs of a chain and of the shared store
    channels_claims.py     Claimer: accepted vouchers claimed many to a transaction

Adding a scheme: a module with a ``Scheme``, registered in the gateway's composition root, and
``payment.scheme`` in the catalog.
"""

from settlement.schemes.base import Facilitator, Scheme, Supported
from settlement.schemes.batch import BatchingFacilitator, BatchPolicy, build_batching
from settlement.schemes.exact import EXACT, ExactEvm, exact_requirements, exact_resolvers
from settlement.schemes.exact_local import VALID_BEFORE_MARGIN_SECONDS, LocalFacilitator, Rejected
from settlement.schemes.exact_resolve import resolve_exact
from settlement.schemes.facilitator_auth import CdpJwtAuth, FacilitatorAuth, FacilitatorAuthError, StaticHeaders
from settlement.schemes.failover import FailoverFacilitator
from settlement.schemes.registry import Schemes
from settlement.schemes.remote import RemoteFacilitator, settlement_outcome_unknown
from settlement.schemes.upto import UPTO, UptoEvm, upto_maximum, upto_requirements
from settlement.schemes.wallets import (
    ANY_NETWORK,
    MULTICALL3_ADDRESS,
    WalletRefused,
    WalletSignature,
    WalletSignatures,
)

__all__ = [
    "ANY_NETWORK",
    "EXACT",
    "UPTO",
    "MULTICALL3_ADDRESS",
    "VALID_BEFORE_MARGIN_SECONDS",
    "BatchPolicy",
    "BatchingFacilitator",
    "CdpJwtAuth",
    "ExactEvm",
    "Facilitator",
    "FacilitatorAuth",
    "FacilitatorAuthError",
    "FailoverFacilitator",
    "LocalFacilitator",
    "Rejected",
    "RemoteFacilitator",
    "Scheme",
    "Schemes",
    "StaticHeaders",
    "UptoEvm",
    "Supported",
    "WalletRefused",
    "WalletSignature",
    "WalletSignatures",
    "build_batching",
    "exact_requirements",
    "exact_resolvers",
    "resolve_exact",
    "settlement_outcome_unknown",
    "upto_maximum",
    "upto_requirements",
]
