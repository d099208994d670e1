"""gateway.protocol.siwx: the EIP-4361 text written here is, field for field, the one the official
SDK's client signs (through signinwithethereum), and nothing a client sends can make it read
otherwise; the 402's challenge is fresh each time."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from eth_account import Account
from x402.extensions.sign_in_with_x import create_siwx_payload, encode_siwx_header, format_siwe_message

from gateway.protocol.siwx import (
    SignInRefused,
    eip4361_message,
    parse_sign_in,
    recover_sign_in,
    siwx_extension,
    validate_sign_in,
)

URL = "https://api.example.com/weather?city=Oslo"
NETWORKS = ["eip155:8453"]
ACCOUNT = Account.from_key("0x" + "11" * 32)


def challenge(**changes: Any) -> dict[str, Any]:
    extension = siwx_extension(URL, NETWORKS, "Sign in to get weather again")["sign-in-with-x"]
    return {**extension["info"], **extension["supportedChains"][0], **changes}


def header(info: dict[str, Any]) -> str:
    return encode_siwx_header(asyncio.run(create_siwx_payload(info, ACCOUNT, URL)))


@pytest.mark.parametrize("changes", [
    {},
    {"statement": None, "resources": None, "expirationTime": None},
    {"notBefore": "2026-01-01T00:00:00.000Z", "requestId": "r-17"},
    {"resources": [URL, "ipfs://bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"]},
])
def test_the_text_is_the_sdk_clients_and_its_signature_recovers(changes: dict[str, Any]) -> None:
    sign_in = parse_sign_in(header(challenge(**changes)), NETWORKS)
    assert eip4361_message(sign_in.payload) == format_siwe_message(sign_in.payload, sign_in.payload.address)
    assert recover_sign_in(sign_in) and sign_in.address == ACCOUNT.address and sign_in.chain_id == 8453
    asyncio.run(validate_sign_in(sign_in, "https://api.example.com"))


def tampered(**changes: Any) -> str:
    """A signed sign-in with ``changes`` made after signing (the signature no longer covers them)."""
    payload = json.loads(base64.b64decode(header(challenge())))
    return base64.b64encode(json.dumps({**payload, **changes}).encode()).decode()


@pytest.mark.parametrize(("wire", "code"), [
    (tampered(statement="Sign in\nURI: https://evil.example"), "invalid_siwx_payload"),
    (tampered(version="2"), "invalid_siwx_payload"),
    (tampered(nonce="short"), "invalid_siwx_payload"),
    (tampered(address="0x1234"), "invalid_siwx_payload"),
    (tampered(signature="0xzz"), "invalid_siwx_payload"),
    (tampered(chainId="eip155:1"), "invalid_siwx_chain_id"),
    (tampered(chainId="solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp"), "invalid_siwx_chain_id"),
    ("x" * 9000, "invalid_siwx_payload"),
    ("bm90IGpzb24=", "invalid_siwx_payload"),
])
def test_fields_that_could_change_the_text_are_refused_before_any_check(wire: str, code: str) -> None:
    with pytest.raises(SignInRefused) as refused:
        parse_sign_in(wire, NETWORKS)
    assert refused.value.code == code


@pytest.mark.parametrize("changes", [{"statement": "Sign in to get everything"}, {"nonce": "a" * 32},
                                     {"issuedAt": "2026-12-04T00:00:00.000Z"}, {"uri": URL + "&units=imperial"}])
def test_a_field_changed_after_signing_does_not_recover(changes: dict[str, Any]) -> None:
    assert not recover_sign_in(parse_sign_in(tampered(**changes), NETWORKS))


def test_each_challenge_is_fresh_and_bound_to_the_resources_origin() -> None:
    first, second = challenge(), challenge()
    assert first["nonce"] != second["nonce"] and len(first["nonce"]) == 32
    assert (first["domain"], first["uri"], first["chainId"], first["type"]) == ("api.example.com", URL, "eip155:8453", "eip191")
    assert siwx_extension(URL, ["solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp"], "s")["sign-in-with-x"]["supportedChains"] == []
