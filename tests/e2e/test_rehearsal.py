"""A rehearsal chain (x402gw devchain --rehearse base-sepolia): anvil with chain id 84532 and the
test token at Base Sepolia's real USDC address under USDC's real EIP-712 name and version; the
catalog that will go live (network: base-sepolia, asset: USDC, price: "$0.01") settles a paid
call end to end on it. Dev keys are allowed there only for a rehearsal on loopback anvil; the
refusal on real networks stands. And catalog validate --check-chain against real anvils."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from eth_account import Account
from web3 import Web3

import catalog
from catalog import Catalogs, load_catalogs
from catalog.registry import stablecoin
from gateway.app import GatewayConfigError, create_app
from gateway.cli.main import main
from gateway.devkit.anvil import Anvil
from gateway.devkit.payer import Payer
from gateway.devkit.rehearsal import setup_rehearsal
from gateway.ops.serving import ThreadServer
from gateway.settings import Settings
from gateway.wiring import build_chains, build_refunder
from settlement.chain.client import SEL_BALANCE_OF
from settlement.chain.deployment import ANVIL_KEYS, Deployment
from settlement.ledger import PaymentState
from settlement.schema import open_ledger
from settlement.schemes.eip712 import domain_separator
from settlement.x402.codec import encode_header
from tests.conftest import PAY_TO, Devchain, offer_of

BASE_SEPOLIA = "eip155:84532"
USDC = stablecoin(BASE_SEPOLIA, "USDC")
assert USDC is not None

LIVE_CATALOG = """\
catalog: 1
owner: acme-live
payment:
  network: base-sepolia
  asset: USDC
  pay_to: "{pay_to}"
upstreams:
  legacy: {{base_url: "{upstream}"}}
tools:
  - name: live_quote
    description: "Latest price for a ticker"
    method: GET
    path: /quotes/{{symbol}}
    upstream_path: /api/v1/quote/{{symbol}}
    price: "$0.01"
    input_schema:
      type: object
      properties: {{symbol: {{type: string}}}}
"""


@dataclass
class Rehearsal:
    anvil: Anvil
    deployment: Deployment
    deployment_file: Path
    w3: Web3

    def balance(self, address: str) -> int:
        data = SEL_BALANCE_OF + bytes.fromhex(address[2:].rjust(64, "0"))
        return int.from_bytes(self.w3.eth.call({"to": USDC.address, "data": data}), "big")

    def call(self, signature: str) -> bytes:
        return bytes(self.w3.eth.call({"to": USDC.address, "data": Web3.keccak(text=signature)[:4]}))


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rehearsal]:
    with Anvil(chain_id=84532) as anvil:
        deployment = setup_rehearsal(anvil.rpc_url, "base-sepolia")
        path = tmp_path_factory.mktemp("rehearsal") / "devchain.json"
        deployment.write(path)
        yield Rehearsal(anvil, deployment, path, Web3(Web3.HTTPProvider(anvil.rpc_url)))


def live_catalog(tmp_path: Path, upstream: str) -> Path:
    path = tmp_path / "live.yaml"
    path.write_text(LIVE_CATALOG.format(pay_to=PAY_TO, upstream=upstream))
    return path


def test_the_rehearsal_chain_imitates_base_sepolia(rehearsal: Rehearsal) -> None:
    assert rehearsal.w3.eth.chain_id == 84532
    deployment = rehearsal.deployment
    assert (deployment.network, deployment.rehearsal, deployment.token.address) == (BASE_SEPOLIA, "base-sepolia", USDC.address)
    assert Web3.to_text(rehearsal.call("name()")[64:]).rstrip("\0") == "USDC"
    assert Web3.to_text(rehearsal.call("version()")[64:]).rstrip("\0") == "2"
    assert rehearsal.call("DOMAIN_SEPARATOR()") == domain_separator("USDC", "2", 84532, USDC.address)
    assert rehearsal.balance(deployment.accounts[0].address) == deployment.accounts[0].usdc_atomic


def pay_once(rehearsal: Rehearsal, settings: Settings, catalogs: Catalogs | None = None, pay_to: str = PAY_TO) -> None:
    """One paid call through a gateway built from ``settings`` (its catalogs loaded by the app
    itself unless given): the 402 names Base Sepolia's USDC, the payment settles on the rehearsal
    chain (exactly 0.01 USDC moves from the payer to ``pay_to``) and the ledger has it settled."""
    ledger = open_ledger(settings.database_url)
    payer = rehearsal.deployment.accounts[1]
    before_payer, before_pay_to = rehearsal.balance(payer.address), rehearsal.balance(pay_to)
    try:
        with ThreadServer(create_app(settings, catalogs=catalogs, ledger=ledger)) as server, \
                httpx.Client(base_url=server.url, timeout=30) as client:
            challenge = client.get("/quotes/ACME")
            offer = offer_of(challenge)
            requirements = offer.accepts[0]
            assert (requirements.network, requirements.asset, requirements.amount) == (BASE_SEPOLIA, USDC.address, "10000")
            assert requirements.pay_to == pay_to and (requirements.extra or {})["name"] == "USDC"
            payment = Payer(payer.private_key).sign(requirements, resource=offer.resource)
            paid = client.get("/quotes/ACME", headers={"PAYMENT-SIGNATURE": encode_header(payment)})
        assert paid.status_code == 200, paid.text
        assert rehearsal.balance(payer.address) == before_payer - 10_000
        assert rehearsal.balance(pay_to) == before_pay_to + 10_000
        assert [(row.state, row.amount) for row in ledger.all()] == [(PaymentState.SETTLED, 10_000)]
    finally:
        ledger.close()


def test_the_live_catalog_settles_a_paid_call_on_the_rehearsal(rehearsal: Rehearsal, tmp_path: Path, upstream: str) -> None:
    settings = Settings(
        catalog=[live_catalog(tmp_path, upstream)], deployment_file=rehearsal.deployment_file,
        database_url=f"sqlite:///{tmp_path / 'ledger.sqlite3'}", receipt_timeout_seconds=10,
    )
    pay_once(rehearsal, settings, load_catalogs(settings.catalog))


# ------------------------------------------- going live: one catalog file, only the environment changes

GOING_LIVE = Path(catalog.__file__).parent / "examples" / "going-live.yaml"
LIVE_PAY_TO = "0x14dC79964da2C08b23698B3D3cc7Ca32193d9955"  # anvil account 7: not the payee of the other tests


def rehearsal_environment(monkeypatch: pytest.MonkeyPatch, rehearsal: Rehearsal, tmp_path: Path, upstream: str) -> None:
    """README "Going live", step 1: the environment of a rehearsal of Base Sepolia (no RPC URL, no
    key: both come from the rehearsal's deployment file), the sample catalog's variables set."""
    for name, value in {
        "X402GW_CATALOG": str(GOING_LIVE), "X402GW_DEPLOYMENT_FILE": str(rehearsal.deployment_file),
        "X402GW_DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.sqlite3'}", "X402GW_ADMIN_TOKEN": "a" * 40,
        "X402GW_NETWORK": "base-sepolia", "X402GW_PAY_TO": LIVE_PAY_TO, "X402GW_UPSTREAM_URL": upstream,
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("X402GW_RPC_URLS", "X402GW_SETTLEMENT_KEY", "X402GW_SETTLEMENT_KEY_FILE", "X402_FACILITATOR_URL", "X402GW_FACILITATORS"):
        monkeypatch.delenv(name, raising=False)


def test_the_going_live_catalog_serves_a_paid_call_on_the_rehearsal_from_its_environment(
    rehearsal: Rehearsal, tmp_path: Path, upstream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rehearsal_environment(monkeypatch, rehearsal, tmp_path, upstream)
    # the app loads the file itself, its ${...} from this process's environment (what `serve` does)
    pay_once(rehearsal, Settings(receipt_timeout_seconds=10), pay_to=LIVE_PAY_TO)


def test_doctor_passes_the_rehearsal_step_and_validate_prints_its_offer(
    rehearsal: Rehearsal, tmp_path: Path, upstream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rehearsal_environment(monkeypatch, rehearsal, tmp_path, upstream)
    open_ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}").close()  # `x402gw db upgrade`
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 0, result.output
    assert f"asset {BASE_SEPOLIA} {USDC.address}: 'USDC' version '2', 6 decimals, as the catalog says" in result.output
    assert f"rpc {BASE_SEPOLIA}: {rehearsal.anvil.rpc_url} serves chain id 84532" in result.output
    settler = Account.from_key(rehearsal.deployment.settlement_key).address  # the rehearsal's dev key: allowed there
    assert f"gas {BASE_SEPOLIA}: settlement account {settler}" in result.output
    code, output = validate(str(GOING_LIVE), "--check-chain", rehearsal.anvil.rpc_url)
    assert code == 0, output
    assert f"offer 1: exact on {BASE_SEPOLIA} (base-sepolia), asset USDC {USDC.address}" in output
    assert f"pay to {LIVE_PAY_TO}" in output and "$0.01 = 0.01 USDC (10000 atomic)" in output
    assert f"chain {BASE_SEPOLIA} {USDC.address}: ok" in output


def test_doctor_still_refuses_a_dev_key_off_a_rehearsal(
    rehearsal: Rehearsal, tmp_path: Path, upstream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rehearsal_environment(monkeypatch, rehearsal, tmp_path, upstream)
    open_ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}").close()
    plain = tmp_path / "plain.json"  # the same anvil, but the deployment file does not mark a rehearsal
    rehearsal.deployment.model_copy(update={"rehearsal": None}).write(plain)
    monkeypatch.setenv("X402GW_DEPLOYMENT_FILE", str(plain))
    monkeypatch.setenv("X402GW_RPC_URLS", json.dumps({BASE_SEPOLIA: rehearsal.anvil.rpc_url}))
    monkeypatch.setenv("X402GW_SETTLEMENT_KEY", ANVIL_KEYS[0])
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 1 and "dev_key_on_public_chain" in result.output, result.output


def _settings(tmp_path: Path, upstream: str, deployment_file: Path, **overrides: object) -> tuple[Settings, object]:
    settings = Settings(catalog=[live_catalog(tmp_path, upstream)], deployment_file=deployment_file, **overrides)  # type: ignore[arg-type]
    return settings, load_catalogs(settings.catalog)


def test_the_rehearsal_allows_its_dev_key_and_the_refund_key(rehearsal: Rehearsal, tmp_path: Path, upstream: str) -> None:
    settings, catalogs = _settings(tmp_path, upstream, rehearsal.deployment_file, refund_key=ANVIL_KEYS[1])
    chains = build_chains(settings, catalogs)  # type: ignore[arg-type]
    assert chains[BASE_SEPOLIA].rpc_urls == [rehearsal.anvil.rpc_url]
    assert build_refunder(settings, chains) is not None


def test_dev_keys_stay_refused_on_the_real_network(rehearsal: Rehearsal, tmp_path: Path, upstream: str) -> None:
    def refused(deployment_file: Path, **overrides: object) -> None:
        settings, catalogs = _settings(tmp_path, upstream, deployment_file, **overrides)
        with pytest.raises(GatewayConfigError) as info:
            build_chains(settings, catalogs)  # type: ignore[arg-type]
        assert info.value.code == "dev_key_on_public_chain"

    key = {"settlement_key": ANVIL_KEYS[0]}
    # a real RPC URL: the rehearsal's deployment file does not help
    refused(rehearsal.deployment_file, rpc_urls={BASE_SEPOLIA: "https://sepolia.base.org"}, **key)
    # a loopback RPC URL that is not anvil (the sample upstream)
    refused(rehearsal.deployment_file, rpc_urls={BASE_SEPOLIA: upstream}, **key)
    # the same anvil, but the deployment file does not mark a rehearsal
    plain = tmp_path / "plain.json"
    rehearsal.deployment.model_copy(update={"rehearsal": None}).write(plain)
    refused(plain, rpc_urls={BASE_SEPOLIA: rehearsal.anvil.rpc_url}, **key)
    # a rehearsal of another network
    other = tmp_path / "other.json"
    rehearsal.deployment.model_copy(update={"rehearsal": "base", "network": "eip155:8453", "chain_id": 8453}).write(other)
    refused(other, rpc_urls={BASE_SEPOLIA: rehearsal.anvil.rpc_url}, **key)
    # the rehearsal on loopback, but a refund key that is a dev key is fine; one off loopback is not
    settings, catalogs = _settings(tmp_path, upstream, rehearsal.deployment_file)
    chains = build_chains(settings, catalogs)  # type: ignore[arg-type]
    real, _ = _settings(tmp_path, upstream, tmp_path / "none.json", refund_key=ANVIL_KEYS[1])
    with pytest.raises(GatewayConfigError) as info:
        build_refunder(real, chains)
    assert info.value.code == "dev_key_on_public_chain"


# ---------------------------------------------------------------------------- --check-chain


def validate(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["catalog", "validate", *args])
    return result.exit_code, result.output


def test_check_chain_passes_on_the_rehearsal_token(rehearsal: Rehearsal, tmp_path: Path, upstream: str) -> None:
    code, output = validate(str(live_catalog(tmp_path, upstream)), "--check-chain", rehearsal.anvil.rpc_url)
    assert code == 0, output
    assert f"offer 1: exact on {BASE_SEPOLIA} (base-sepolia), asset USDC {USDC.address}" in output
    assert "live_quote" in output and "$0.01 = 0.01 USDC (10000 atomic)" in output
    assert f"chain {BASE_SEPOLIA} {USDC.address}: ok, 'USDC' version '2', 6 decimals" in output


LOCAL_CATALOG = """\
catalog: 1
owner: acme
payment:
  network: local
  asset: "{token}"
  asset_name: "{name}"
  asset_version: "{version}"
  decimals: {decimals}
  pay_to: "{pay_to}"
upstreams:
  api: {{base_url: "http://127.0.0.1:9101"}}
tools:
  - name: quote
    description: "A quote"
    method: GET
    path: /quotes
    price: "0.01"
"""


@pytest.mark.parametrize(("name", "version", "decimals", "problem"), [
    ("USD Coin", "2", 6, None),
    ("USDC", "2", 6, "asset_name_mismatch"),
    ("USD Coin", "1", 6, "asset_version_mismatch"),
    ("USD Coin", "2", 18, "asset_decimals_mismatch"),
])
def test_check_chain_refuses_a_token_that_is_not_what_the_catalog_says(
    devchain: Devchain, tmp_path: Path, name: str, version: str, decimals: int, problem: str | None
) -> None:
    path = tmp_path / "local.yaml"
    path.write_text(LOCAL_CATALOG.format(token=devchain.token, name=name, version=version, decimals=decimals, pay_to=PAY_TO))
    assert validate(str(path))[0] == 0  # the file alone is valid: only the chain knows
    code, output = validate(str(path), "--check-chain", devchain.anvil.rpc_url)
    if problem is None:
        assert code == 0 and "ok, 'USD Coin' version '2', 6 decimals" in output, output
    else:
        assert code == 1 and problem in output, output


def test_check_chain_names_a_chain_without_the_offers_network(devchain: Devchain, rehearsal: Rehearsal, tmp_path: Path, upstream: str) -> None:
    code, output = validate(str(live_catalog(tmp_path, upstream)), "--check-chain", devchain.anvil.rpc_url)
    assert code == 1 and "rpc_network_unused" in output and "not checked" in output, output


def test_devchain_rehearse_writes_a_marked_deployment(tmp_path: Path) -> None:
    from gateway.devkit.rehearsal import run_rehearsal

    stop, lines = threading.Event(), []

    def echo(line: str) -> None:
        lines.append(line)
        if "Press Ctrl-C" in line:
            stop.set()  # the chain is up and its file written: stop it

    path = tmp_path / "devchain.json"
    assert run_rehearsal("base-sepolia", port=0, deployment_path=path, echo=echo, stop_event=stop) == 0
    deployment = Deployment.read(path)
    assert (deployment.chain_id, deployment.rehearsal, deployment.token.address) == (84532, "base-sepolia", USDC.address)
    assert any("rehearsal    of base-sepolia" in line for line in lines)
    assert run_rehearsal("nowhere", echo=lines.append) == 2 and "rehearsal_unknown_network" in lines[-1]
