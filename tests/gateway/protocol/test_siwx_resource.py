"""gateway.protocol.siwx.require_resource: a sign-in opens only the resource its challenge named (its
uri, and its resources when listed), not another tool or request on the same origin; the SDK's own
check compares the origin alone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from eth_account import Account
from x402.extensions.sign_in_with_x import create_siwx_payload, encode_siwx_header

from gateway.protocol.siwx import SignInRefused, parse_sign_in, require_resource, siwx_extension, validate_sign_in

ORIGIN = "https://api.example.com"
URL = f"{ORIGIN}/weather?city=Oslo&units=metric"
NETWORKS = ["eip155:8453"]
ACCOUNT = Account.from_key("0x" + "22" * 32)


def sign_in(url: str = URL, **changes: Any) -> Any:
    extension = siwx_extension(url, NETWORKS, "Sign in")["sign-in-with-x"]
    info = {**extension["info"], **extension["supportedChains"][0], **changes}
    return parse_sign_in(encode_siwx_header(asyncio.run(create_siwx_payload(info, ACCOUNT, url))), NETWORKS)


def test_the_resource_the_challenge_named_is_accepted() -> None:
    made = sign_in()
    asyncio.run(validate_sign_in(made, ORIGIN))
    require_resource(made, URL)
    require_resource(made, f"{ORIGIN}/weather?units=metric&city=Oslo")  # the same query, in another order
    require_resource(sign_in(resources=None), URL)  # no resources listed: the uri binds


@pytest.mark.parametrize(("made", "presented"), [
    ({}, f"{ORIGIN}/quotes/ACME"),  # another tool on the same origin
    ({}, f"{ORIGIN}/weather?city=Rome&units=metric"),  # other arguments
    ({}, f"{ORIGIN}/weather"),
    ({"url": f"{ORIGIN}/a/X"}, f"{ORIGIN}/a/X/more"),
    ({"resources": [f"{ORIGIN}/quotes/ACME"]}, URL),  # uri right, resources name another
    ({"uri": f"{ORIGIN}/quotes/ACME"}, URL),  # resources right, uri names another
])
def test_a_sign_in_for_another_resource_is_refused(made: dict[str, Any], presented: str) -> None:
    signed = sign_in(**made)
    with pytest.raises(SignInRefused) as refused:
        require_resource(signed, presented)
    assert refused.value.code == "invalid_siwx_uri_mismatch"
