"""EIP-712 digest and signer recovery, checked against eth-account as the reference implementation."""

from __future__ import annotations

from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.devkit.payer import Payer
from settlement.schemes.eip712 import (
    SECP256K1_HALF_N,
    SECP256K1_N,
    TransferAuthorization,
    authorization_digest,
    domain_separator,
    recover_signer,
)
from settlement.x402.wire import PaymentRequirements

UINT256 = st.integers(min_value=0, max_value=2**256 - 1)
ADDRESSES = st.binary(min_size=20, max_size=20).map(to_checksum_address)
PRIVATE_KEYS = st.integers(min_value=1, max_value=SECP256K1_N - 1).map(lambda k: "0x" + k.to_bytes(32, "big").hex())

# Anvil dev account #1 and the token address of the first deployment on a fresh anvil.
ANVIL_KEY_1 = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"
ANVIL_ADDRESS_1 = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
ANVIL_ADDRESS_2 = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
CHAIN_ID = 31337

# Computed once with eth-account 0.14 (Account.sign_typed_data) for the vector below.
KNOWN_DOMAIN_SEPARATOR = "fc557a58e1177dd0b729c40130003009d1ffed5a502b494889e2711c7726dd52"
KNOWN_DIGEST = "14a44984c3a2d4fa7cc96134cfa43567147975f01252676180125d254be91203"
KNOWN_SIGNATURE = (
    "4b8a69f15108e444f19e8834dc3add65e02095498b09627f5187c9f9bc466277"
    "40e5735b449ba2a3897d4787399c2e9e69cbbaec8085bbb62c06fd6301b0429a1b"
)


def typed_data(name: str, version: str, chain_id: int, token: str, auth: TransferAuthorization) -> dict[str, Any]:
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "TransferWithAuthorization": [
                {"name": "from", "type": "address"},
                {"name": "to", "type": "address"},
                {"name": "value", "type": "uint256"},
                {"name": "validAfter", "type": "uint256"},
                {"name": "validBefore", "type": "uint256"},
                {"name": "nonce", "type": "bytes32"},
            ],
        },
        "primaryType": "TransferWithAuthorization",
        "domain": {"name": name, "version": version, "chainId": chain_id, "verifyingContract": token},
        "message": {
            "from": auth.from_,
            "to": auth.to,
            "value": auth.value,
            "validAfter": auth.valid_after,
            "validBefore": auth.valid_before,
            "nonce": auth.nonce,
        },
    }


def known_authorization() -> TransferAuthorization:
    return TransferAuthorization(
        from_=ANVIL_ADDRESS_1,
        to=ANVIL_ADDRESS_2,
        value=1_000_000,
        valid_after=0,
        valid_before=1_700_000_060,
        nonce=bytes.fromhex("ab" * 32),
    )


def known_digest() -> bytes:
    return authorization_digest(domain_separator("USD Coin", "2", CHAIN_ID, TOKEN), known_authorization())


def known_signature() -> bytes:
    return bytes.fromhex(KNOWN_SIGNATURE)


@settings(max_examples=50, deadline=None)
@given(
    key=PRIVATE_KEYS,
    name=st.text(max_size=40),
    version=st.text(max_size=10),
    chain_id=st.integers(min_value=0, max_value=2**64),
    token=ADDRESSES,
    to=ADDRESSES,
    value=UINT256,
    valid_after=UINT256,
    valid_before=UINT256,
    nonce=st.binary(min_size=32, max_size=32),
)
def test_digest_and_recovery_match_eth_account(
    key: str,
    name: str,
    version: str,
    chain_id: int,
    token: str,
    to: str,
    value: int,
    valid_after: int,
    valid_before: int,
    nonce: bytes,
) -> None:
    address = Account.from_key(key).address
    auth = TransferAuthorization(
        from_=address, to=to, value=value, valid_after=valid_after, valid_before=valid_before, nonce=nonce
    )
    signed = Account.sign_typed_data(key, full_message=typed_data(name, version, chain_id, token, auth))

    digest = authorization_digest(domain_separator(name, version, chain_id, token), auth)

    assert digest == bytes(signed.message_hash)
    assert recover_signer(digest, bytes(signed.signature)) == address


@settings(max_examples=50, deadline=None)
@given(key=PRIVATE_KEYS, amount=UINT256, nonce=st.binary(min_size=32, max_size=32), pay_to=ADDRESSES)
def test_payer_signature_recovers_with_eth_account(key: str, amount: int, nonce: bytes, pay_to: str) -> None:
    payer = Payer(key)
    requirements = PaymentRequirements(
        scheme="exact",
        network=f"eip155:{CHAIN_ID}",
        amount=str(amount),
        asset=TOKEN,
        pay_to=pay_to,
        max_timeout_seconds=60,
        extra={"name": "USD Coin", "version": "2"},
    )
    payload = payer.sign(requirements, now=1_700_000_000, nonce=nonce)
    wire = payload.payload["authorization"]
    auth = TransferAuthorization(
        from_=wire["from"],
        to=wire["to"],
        value=int(wire["value"]),
        valid_after=int(wire["validAfter"]),
        valid_before=int(wire["validBefore"]),
        nonce=bytes.fromhex(wire["nonce"][2:]),
    )
    signature = bytes.fromhex(payload.payload["signature"][2:])
    message = encode_typed_data(full_message=typed_data("USD Coin", "2", CHAIN_ID, TOKEN, auth))
    digest = authorization_digest(domain_separator("USD Coin", "2", CHAIN_ID, TOKEN), auth)

    assert wire["from"] == payer.address
    assert Account._recover_hash(digest, signature=signature) == payer.address
    assert Account.recover_message(message, signature=signature) == payer.address
    assert signature[64] in (27, 28)
    assert int.from_bytes(signature[32:64], "big") <= SECP256K1_HALF_N


def test_known_vector() -> None:
    digest = known_digest()
    message = typed_data("USD Coin", "2", CHAIN_ID, TOKEN, known_authorization())

    assert domain_separator("USD Coin", "2", CHAIN_ID, TOKEN).hex() == KNOWN_DOMAIN_SEPARATOR
    assert digest.hex() == KNOWN_DIGEST
    assert bytes(Account.sign_typed_data(ANVIL_KEY_1, full_message=message).message_hash).hex() == KNOWN_DIGEST
    assert recover_signer(digest, known_signature()) == ANVIL_ADDRESS_1


def test_known_vector_payer_signature() -> None:
    requirements = PaymentRequirements(
        scheme="exact",
        network=f"eip155:{CHAIN_ID}",
        amount="1000000",
        asset=TOKEN,
        pay_to=ANVIL_ADDRESS_2,
        max_timeout_seconds=60,
        extra={"name": "USD Coin", "version": "2"},
    )

    payload = Payer(ANVIL_KEY_1).sign(requirements, now=1_700_000_000, nonce=bytes.fromhex("ab" * 32))

    # RFC 6979 nonces make the signature deterministic: coincurve and eth-account agree byte for byte.
    assert payload.payload["signature"] == "0x" + KNOWN_SIGNATURE
    assert payload.payload["authorization"] == {
        "from": ANVIL_ADDRESS_1,
        "to": ANVIL_ADDRESS_2,
        "value": "1000000",
        "validAfter": "0",
        "validBefore": "1700000060",
        "nonce": "0x" + "ab" * 32,
    }


def test_v_as_0_or_1_is_accepted() -> None:
    signature = known_signature()
    raw = signature[:64] + bytes([signature[64] - 27])

    assert recover_signer(known_digest(), raw) == ANVIL_ADDRESS_1


def test_high_s_variant_is_refused() -> None:
    signature = known_signature()
    r, s, v = signature[:32], int.from_bytes(signature[32:64], "big"), signature[64]
    high_s = r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])  # 27 <-> 28

    # The malleated signature is mathematically valid for the same key: only the low-s rule rejects it.
    assert Account._recover_hash(known_digest(), vrs=(55 - v, int.from_bytes(r, "big"), SECP256K1_N - s)) == (
        ANVIL_ADDRESS_1
    )
    assert recover_signer(known_digest(), high_s) is None


def test_v_outside_0_1_27_28_is_refused() -> None:
    signature = known_signature()
    for v in (2, 26, 29, 35, 36, 37, 255):
        assert recover_signer(known_digest(), signature[:64] + bytes([v])) is None, v


def test_wrong_length_is_refused() -> None:
    signature = known_signature()

    assert recover_signer(known_digest(), signature[:64]) is None
    assert recover_signer(known_digest(), signature + b"\x00") is None
    assert recover_signer(known_digest(), b"") is None


def test_zero_or_out_of_range_r_and_s_are_refused() -> None:
    signature = known_signature()
    r, s, v = signature[:32], signature[32:64], signature[64:]
    zero = bytes(32)

    assert recover_signer(known_digest(), zero + s + v) is None
    assert recover_signer(known_digest(), r + zero + v) is None
    assert recover_signer(known_digest(), SECP256K1_N.to_bytes(32, "big") + s + v) is None
    assert recover_signer(known_digest(), b"\xff" * 32 + s + v) is None


def test_other_digest_recovers_another_address() -> None:
    other = authorization_digest(
        domain_separator("USD Coin", "2", CHAIN_ID + 1, TOKEN), known_authorization()
    )

    assert recover_signer(other, known_signature()) != ANVIL_ADDRESS_1


def test_a_recovery_is_remembered_and_never_confused(monkeypatch: Any) -> None:
    """The second ask for the same (digest, signature) is not recomputed (decode_and_bind and verify
    both ask for every paid call); any other pair is, and a bytearray asks the same as bytes."""
    import settlement.schemes.eip712 as eip712

    recoveries: list[bytes] = []
    real = eip712.PublicKey.from_signature_and_message

    def counted(signature: bytes, message: bytes, hasher: Any = None) -> Any:
        recoveries.append(message)
        return real(signature, message, hasher=hasher)

    monkeypatch.setattr(eip712.PublicKey, "from_signature_and_message", staticmethod(counted))
    eip712._recover_signer.cache_clear()
    digest, signature = bytes.fromhex(KNOWN_DIGEST), bytes.fromhex(KNOWN_SIGNATURE)
    assert recover_signer(digest, signature) == ANVIL_ADDRESS_1
    assert recover_signer(bytearray(digest), bytearray(signature)) == ANVIL_ADDRESS_1
    assert len(recoveries) == 1
    other = bytes([digest[0] ^ 1]) + digest[1:]  # another message under the same signature
    assert recover_signer(other, signature) != ANVIL_ADDRESS_1
    junk = signature[:40] + bytes([signature[40] ^ 1]) + signature[41:]  # the payer's message, a junk signature
    assert recover_signer(digest, junk) != ANVIL_ADDRESS_1
    assert len(recoveries) == 3
    assert recover_signer(digest, signature) == ANVIL_ADDRESS_1 and len(recoveries) == 3
