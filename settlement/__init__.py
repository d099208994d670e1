"""x402 settlement: wire models, the exact-EVM scheme, facilitators, chain access, ledger.

May import `catalog`; knows no HTTP framework.
"""

import os as _os
from importlib.util import find_spec as _find_spec

# eth-hash (keccak256 for eth-account, eth-utils and our EIP-712 digests) takes pycryptodome's
# backend before pysha3's unless ETH_HASH_BACKEND names one; pysha3's (safe-pysha3, a dependency)
# hashes in 0.7 us against 3.8, and a paid call hashes about twenty times. It reads the variable at
# its first hash, which no import makes; one set by the operator is kept.
if "ETH_HASH_BACKEND" not in _os.environ and _find_spec("sha3") is not None:
    _os.environ["ETH_HASH_BACKEND"] = "pysha3"
