"""The served facilitator API is for this gateway's own payees and assets unless the operator says
otherwise, and /settle broadcasts only what verify (on chain) accepts: nobody spends its gas on
their own transfers, their own tokens, spent authorizations or empty accounts."""

from __future__ import annotations

import httpx
import pytest
from eth_account import Account

from gateway.devkit.payer import Payer
from gateway.errors import GatewayConfigError
from gateway.settings import Settings
from tests.conftest import PAY_TO, Devchain, GatewayFactory
from tests.gateway.surfaces.test_facilitator_api import (
    NETWORK,
    PAYER,
    PRICE,
    balances,
    dead_rpc_url,
    request_body,
    requirements,
    serving,
    settlement_nonce,
)

OTHER_TOKEN = "0x" + "42" * 20
USDC_BASE = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"


# -- settings: empty is the catalog's own, "*" is any, and only when said ---------------------------


def test_empty_allow_lists_are_the_catalogs_own_and_star_is_any() -> None:
    own_pay_to, own_assets = {PAY_TO}, {(NETWORK, OTHER_TOKEN)}
    assert Settings().facilitator.allowed(own_pay_to, own_assets) == ([PAY_TO], [(NETWORK, OTHER_TOKEN)])
    anything = Settings(facilitator_pay_to="*", facilitator_assets="*")
    assert anything.facilitator.allowed(own_pay_to, own_assets) == (None, None)
    configured = Settings(facilitator_pay_to=f" {USDC_BASE} ", facilitator_assets=f"base/{USDC_BASE}, {NETWORK}/{OTHER_TOKEN}")
    assert configured.facilitator.allowed(own_pay_to, own_assets) == (
        [USDC_BASE], [("eip155:8453", USDC_BASE), (NETWORK, OTHER_TOKEN)]
    )


@pytest.mark.parametrize(
    ("setting", "value", "code"),
    [
        ("facilitator_pay_to", "0x1234", "invalid_facilitator_pay_to"),
        ("facilitator_pay_to", f"*,{PAY_TO}", "invalid_facilitator_pay_to"),
        ("facilitator_assets", USDC_BASE, "invalid_facilitator_assets"),  # no network
        ("facilitator_assets", f"{NETWORK}/0x1234", "invalid_facilitator_assets"),
        ("facilitator_assets", f"nowhere/{USDC_BASE}", "invalid_facilitator_assets"),
        ("facilitator_assets", f"{NETWORK}/{USDC_BASE},*", "invalid_facilitator_assets"),
    ],
)
def test_bad_allow_list_values_are_refused_with_a_stable_code(setting: str, value: str, code: str) -> None:
    with pytest.raises(GatewayConfigError) as bad:
        Settings(**{setting: value})
    assert bad.value.code == code and setting in bad.value.message


# -- the gateway's defaults --------------------------------------------------------------------------


def test_by_default_the_gateway_serves_its_own_payee_and_asset_only(
    start_gateway: GatewayFactory, devchain: Devchain
) -> None:
    gateway = start_gateway(serve_facilitator=True)
    own = requirements(devchain)
    stranger = requirements(devchain, pay_to=devchain.address(PAYER + 1))
    junk = requirements(devchain, asset=OTHER_TOKEN)
    nonce, before = settlement_nonce(devchain), balances(devchain)
    with gateway.client() as client:
        for reqs, reason in ((stranger, "pay_to_not_allowed"), (junk, "asset_not_allowed")):
            body = request_body(Payer(devchain.key(PAYER)).sign(reqs), reqs)
            assert client.post("/facilitator/verify", json=body).json()["invalidReason"] == reason
            assert client.post("/facilitator/settle", json=body).json()["errorReason"] == reason
        assert settlement_nonce(devchain) == nonce and balances(devchain) == before
        settled = client.post("/facilitator/settle", json=request_body(Payer(devchain.key(PAYER)).sign(own), own)).json()
    assert settled["success"] is True, settled
    assert settlement_nonce(devchain) == nonce + 1
    assert balances(devchain) == (before[0] - PRICE, before[1] + PRICE)


def test_star_allows_any_payto_and_a_configured_asset_list_replaces_the_catalogs(
    start_gateway: GatewayFactory, devchain: Devchain
) -> None:
    gateway = start_gateway(serve_facilitator=True, facilitator_pay_to="*", facilitator_assets=f"{NETWORK}/{OTHER_TOKEN}")
    stranger = requirements(devchain, pay_to=devchain.address(PAYER + 1))
    nonce = settlement_nonce(devchain)
    with gateway.client() as client:
        body = request_body(Payer(devchain.key(PAYER)).sign(stranger), stranger)
        # the payTo is allowed ("*"); the catalog's own token is not on the configured asset list
        assert client.post("/facilitator/verify", json=body).json()["invalidReason"] == "asset_not_allowed"
        assert client.post("/facilitator/settle", json=body).json()["errorReason"] == "asset_not_allowed"
    assert settlement_nonce(devchain) == nonce


# -- the API itself: assets refused before any RPC; settle verifies on chain first -----------------


def test_asset_allow_list_refuses_other_assets_and_networks_without_any_rpc(devchain: Devchain) -> None:
    nonce, before = settlement_nonce(devchain), balances(devchain)
    with serving(devchain, rpc_url=dead_rpc_url(), assets=[(NETWORK, devchain.token.upper().replace("0X", "0x"))]) as (url, _):
        for reqs in (requirements(devchain, asset=OTHER_TOKEN), requirements(devchain, network="eip155:8453")):
            body = request_body(Payer(devchain.key(PAYER)).sign(reqs), reqs)
            verified = httpx.post(f"{url}/verify", json=body, timeout=30).json()
            assert (verified["isValid"], verified["invalidReason"]) == (False, "asset_not_allowed")
            settled = httpx.post(f"{url}/settle", json=body, timeout=30).json()
            assert (settled["success"], settled["errorReason"]) == (False, "asset_not_allowed")
        # the allowed asset (compared case-insensitively) reaches the dead chain: an outage, not a broadcast
        own = requirements(devchain)
        body = request_body(Payer(devchain.key(PAYER)).sign(own), own)
        assert httpx.post(f"{url}/verify", json=body, timeout=30).json()["invalidReason"] == "unexpected_verify_error"
        assert httpx.post(f"{url}/settle", json=body, timeout=30).json()["errorReason"] == "unexpected_settle_error"
    assert settlement_nonce(devchain) == nonce and balances(devchain) == before


def test_a_payment_settled_elsewhere_is_refused_with_verifys_reason_and_costs_no_gas(devchain: Devchain) -> None:
    """Settled through one API instance, presented to a fresh one (a restart, another replica):
    nothing remembered, so only the chain can tell; settle asks it before any broadcast."""
    reqs = requirements(devchain)
    payload = Payer(devchain.key(PAYER)).sign(reqs)
    with serving(devchain) as (url, _):
        assert httpx.post(f"{url}/settle", json=request_body(payload, reqs), timeout=30).json()["success"] is True
    nonce, after = settlement_nonce(devchain), balances(devchain)
    with serving(devchain) as (url, _):
        for _ in range(3):
            settled = httpx.post(f"{url}/settle", json=request_body(payload, reqs), timeout=30).json()
            assert (settled["success"], settled["errorReason"]) == (False, "invalid_exact_evm_nonce_already_used")
            assert settled["payer"] == devchain.address(PAYER) and not settled.get("transaction")
    assert settlement_nonce(devchain) == nonce and balances(devchain) == after


def test_an_authorization_beyond_the_payers_balance_is_refused_before_broadcast(devchain: Devchain) -> None:
    empty = Account.create()
    reqs = requirements(devchain)
    payload = Payer(empty.key.hex()).sign(reqs)
    nonce, pay_to = settlement_nonce(devchain), devchain.balance(PAY_TO)
    with serving(devchain, pay_to=[PAY_TO], assets=[(NETWORK, devchain.token)]) as (url, _):
        settled = httpx.post(f"{url}/settle", json=request_body(payload, reqs), timeout=30).json()
    assert (settled["success"], settled["errorReason"]) == (False, "invalid_exact_evm_insufficient_balance")
    assert settlement_nonce(devchain) == nonce and devchain.balance(PAY_TO) == pay_to
    assert devchain.authorization_state(empty.address, payload.payload["authorization"]["nonce"]) is False
