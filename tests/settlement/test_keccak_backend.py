"""keccak256 runs on pysha3's C code (safe-pysha3) in a gateway process, unless the operator names
another eth-hash backend: a paid call hashes about twenty times."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = (
    "import gateway.app\n"
    "from eth_hash.auto import keccak\n"
    "assert keccak(b'').hex() == 'c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470'\n"
    "print(type(keccak.hasher.__self__).__name__)\n"
)


@pytest.mark.parametrize(("given", "expected"), [(None, "PySha3Backend"), ("pycryptodome", "CryptodomeBackend")])
def test_the_gateway_hashes_with_pysha3_unless_told_otherwise(given: str | None, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ETH_HASH_BACKEND"}
    if given is not None:
        env["ETH_HASH_BACKEND"] = given
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == expected
