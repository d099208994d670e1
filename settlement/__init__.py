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

# py-ecc (imported by eth-keys, which recovers every signature) raises the interpreter's recursion
# limit to 100,000 as it is imported. At that depth, a JSON document nested some 80,000 levels deep
# (400 KB: a request body, an upstream's answer) exhausts the thread's stack in the C decoder and the
# process dies (SIGSEGV) instead of raising RecursionError, which every parse of outside JSON answers
# as invalid. Imported here first, and the limit put back: py-ecc's own recursion (point
# multiplication, about 256 deep) fits far below it.
import sys as _sys

import py_ecc as _py_ecc  # noqa: F401

RECURSION_LIMIT = 1000  # Python's default
_sys.setrecursionlimit(RECURSION_LIMIT)
