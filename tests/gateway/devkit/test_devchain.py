"""The dev chain on a real anvil: start-up, token deployment, and TestUSDC's EIP-3009 behaviour.

One anvil per module (port 0); every test runs inside an evm_snapshot / evm_revert pair.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from web3 import HTTPProvider, Web3
from web3.contract import Contract
from web3.exceptions import ContractLogicError
from web3.logs import DISCARD

from gateway.devkit.devchain import (
    ANVIL_ADDRESSES,
    ANVIL_KEYS,
    ANVIL_MNEMONIC,
    DEFAULT_MINT_ATOMIC,
    DEFAULT_TOKEN_ADDRESS,
    LOCAL_CHAIN_ID,
    Anvil,
    Deployment,
    DevchainError,
    find_anvil,
    load_token_artifact,
    run_devchain,
    setup_devchain,
)

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
PAYER, PAYER_KEY = ANVIL_ADDRESSES[1], ANVIL_KEYS[1]
PAYEE = ANVIL_ADDRESSES[2]
RELAYER, RELAYER_KEY = ANVIL_ADDRESSES[0], ANVIL_KEYS[0]
AUTH_FIELDS = [
    {"name": "from", "type": "address"},
    {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
]
DOMAIN_FIELDS = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]


@pytest.fixture(scope="module")
def devchain_anvil() -> Iterator[Anvil]:
    try:
        find_anvil()
    except DevchainError as exc:
        pytest.fail(str(exc))
    with Anvil() as anvil:
        yield anvil


@pytest.fixture(scope="module")
def deployment(devchain_anvil: Anvil) -> Deployment:
    return setup_devchain(devchain_anvil.rpc_url)


@pytest.fixture(scope="module")
def w3(devchain_anvil: Anvil) -> Web3:
    return Web3(HTTPProvider(devchain_anvil.rpc_url))


@pytest.fixture(scope="module")
def token(w3: Web3, deployment: Deployment) -> Contract:
    return w3.eth.contract(address=Web3.to_checksum_address(deployment.token.address), abi=load_token_artifact()["abi"])


@pytest.fixture(autouse=True)
def snapshot(request: pytest.FixtureRequest) -> Iterator[None]:
    if "w3" not in request.fixturenames:
        yield
        return
    chain: Web3 = request.getfixturevalue("w3")
    request.getfixturevalue("deployment")  # the snapshot must include the token
    snapshot_id = chain.provider.make_request("evm_snapshot", [])["result"]  # type: ignore[arg-type]
    yield
    assert chain.provider.make_request("evm_revert", [snapshot_id])["result"] is True  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ helpers


def latest_timestamp(w3: Web3) -> int:
    return int(w3.eth.get_block("latest")["timestamp"])


def sign_authorization(
    token: Contract,
    key: str,
    *,
    to: str = PAYEE,
    value: int = 1_000_000,
    valid_after: int = 0,
    valid_before: int | None = None,
    nonce: bytes | None = None,
    primary_type: str = "TransferWithAuthorization",
) -> dict[str, Any]:
    signer = Account.from_key(key)
    message = {
        "from": signer.address,
        "to": to,
        "value": value,
        "validAfter": valid_after,
        "validBefore": valid_before if valid_before is not None else latest_timestamp(token.w3) + 3600,
        "nonce": nonce if nonce is not None else os.urandom(32),
    }
    full_message = {
        "types": {"EIP712Domain": DOMAIN_FIELDS, primary_type: AUTH_FIELDS},
        "primaryType": primary_type,
        "domain": {
            "name": "USD Coin",
            "version": "2",
            "chainId": LOCAL_CHAIN_ID,
            "verifyingContract": token.address,
        },
        "message": message,
    }
    signed = Account.sign_typed_data(key, full_message=full_message)
    return {**message, "v": signed.v, "r": signed.r.to_bytes(32, "big"), "s": signed.s.to_bytes(32, "big")}


def auth_args(auth: dict[str, Any]) -> list[Any]:
    return [auth[k] for k in ("from", "to", "value", "validAfter", "validBefore", "nonce", "v", "r", "s")]


def packed_signature(auth: dict[str, Any]) -> bytes:
    return bytes(auth["r"]) + bytes(auth["s"]) + bytes([auth["v"]])


def transact(w3: Web3, call: Any, key: str = RELAYER_KEY, gas: int = 300_000) -> Any:
    """Send with a fixed gas limit (no estimate), so a reverting call is mined and seen as status 0."""
    sender = Account.from_key(key).address
    tx = call.build_transaction(
        {
            "from": sender,
            "nonce": w3.eth.get_transaction_count(sender),
            "gas": gas,
            "maxFeePerGas": 10**10,
            "maxPriorityFeePerGas": 10**9,
            "chainId": LOCAL_CHAIN_ID,
        }
    )
    signed = Account.sign_transaction(tx, key)
    return w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(signed.raw_transaction))


def assert_reverts(call: Any, reason: str, sender: str = RELAYER) -> None:
    with pytest.raises(ContractLogicError) as info:
        call.call({"from": sender})
    assert info.value.message == f"execution reverted: {reason}"


# ------------------------------------------------------------------------- anvil and set-up


def test_anvil_port_zero_gets_a_free_port_and_stops(devchain_anvil: Anvil) -> None:
    with Anvil() as second:
        assert second.port not in (0, devchain_anvil.port)
        assert Web3(HTTPProvider(second.rpc_url)).eth.chain_id == LOCAL_CHAIN_ID
    assert not second.running


def test_anvil_on_a_busy_port_fails_with_anvils_reason(devchain_anvil: Anvil) -> None:
    with pytest.raises(DevchainError) as info:
        Anvil(devchain_anvil.port, startup_timeout=10).start()
    assert info.value.code == "anvil_start_failed"


def test_find_anvil_rejects_a_bad_explicit_path(tmp_path: Path) -> None:
    with pytest.raises(DevchainError) as info:
        find_anvil(str(tmp_path / "no-anvil"))
    assert info.value.code == "anvil_not_found"


def test_anvil_keys_are_the_mnemonic_accounts() -> None:
    Account.enable_unaudited_hdwallet_features()
    for i, (key, address) in enumerate(zip(ANVIL_KEYS, ANVIL_ADDRESSES, strict=True)):
        derived = Account.from_mnemonic(ANVIL_MNEMONIC, account_path=f"m/44'/60'/0'/0/{i}")
        assert (derived.key.to_0x_hex(), derived.address) == (key, address)


def test_setup_deploys_the_token_at_the_default_address(deployment: Deployment, token: Contract) -> None:
    assert deployment.token.address == DEFAULT_TOKEN_ADDRESS
    assert deployment.chain_id == LOCAL_CHAIN_ID
    assert deployment.network == "eip155:31337"
    assert deployment.deployer == ANVIL_ADDRESSES[0]
    assert Account.from_key(deployment.settlement_key).address == ANVIL_ADDRESSES[0]
    assert token.functions.name().call() == "USD Coin"
    assert token.functions.symbol().call() == "USDC"
    assert token.functions.version().call() == "2"
    assert token.functions.decimals().call() == 6
    assert token.functions.totalSupply().call() == 9 * DEFAULT_MINT_ATOMIC
    assert [a.index for a in deployment.accounts] == list(range(1, 10))
    for account in deployment.accounts:
        assert account.address == ANVIL_ADDRESSES[account.index]
        assert Account.from_key(account.private_key).address == account.address
        assert account.usdc_atomic == DEFAULT_MINT_ATOMIC
        assert token.functions.balanceOf(account.address).call() == DEFAULT_MINT_ATOMIC
    assert token.functions.balanceOf(ANVIL_ADDRESSES[0]).call() == 0


def test_deployment_round_trips_through_its_file(deployment: Deployment, tmp_path: Path) -> None:
    path = tmp_path / "var" / "devchain.json"
    deployment.write(path)
    assert Deployment.read(path) == deployment
    assert [p.name for p in path.parent.iterdir()] == ["devchain.json"]  # no temp file left


def test_deployment_read_errors(tmp_path: Path) -> None:
    with pytest.raises(DevchainError) as missing:
        Deployment.read(tmp_path / "nope.json")
    assert missing.value.code == "deployment_missing"
    bad = tmp_path / "bad.json"
    bad.write_text('{"rpc_url": 1}')
    with pytest.raises(DevchainError) as invalid:
        Deployment.read(bad)
    assert invalid.value.code == "deployment_invalid"
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # would be waited on for ever; /dev/zero read for ever
    for special in (fifo, Path("/dev/zero"), tmp_path):
        with pytest.raises(DevchainError, match="not a regular file") as refused:
            Deployment.read(special)
        assert refused.value.code == "deployment_invalid"


def test_domain_separator_and_typehash_match_eip712(token: Contract) -> None:
    message = encode_typed_data(
        full_message={
            "types": {"EIP712Domain": DOMAIN_FIELDS, "TransferWithAuthorization": AUTH_FIELDS},
            "primaryType": "TransferWithAuthorization",
            "domain": {"name": "USD Coin", "version": "2", "chainId": LOCAL_CHAIN_ID, "verifyingContract": token.address},
            "message": {"from": PAYER, "to": PAYEE, "value": 1, "validAfter": 0, "validBefore": 1, "nonce": b"\0" * 32},
        }
    )
    assert token.functions.DOMAIN_SEPARATOR().call() == message.header
    assert token.functions.TRANSFER_WITH_AUTHORIZATION_TYPEHASH().call() == Web3.keccak(
        text="TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,"
        "uint256 validBefore,bytes32 nonce)"
    )


def test_selectors_match_usdc(token: Contract) -> None:
    selectors = {
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)": "e3ee160e",
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)": "cf092995",
        "receiveWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)": "ef55bec6",
        "cancelAuthorization(address,bytes32,uint8,bytes32,bytes32)": "5a049a70",
        "authorizationState(address,bytes32)": "e94a0102",
    }
    for signature, selector in selectors.items():
        assert Web3.keccak(text=signature)[:4].hex() == selector
        assert token.get_function_by_signature(signature) is not None


# ------------------------------------------------------------------------------ ERC-20 basics


def test_erc20_transfer_approve_transfer_from(w3: Web3, token: Contract) -> None:
    assert transact(w3, token.functions.transfer(PAYEE, 5), PAYER_KEY).status == 1
    assert token.functions.balanceOf(PAYEE).call() == DEFAULT_MINT_ATOMIC + 5
    assert transact(w3, token.functions.approve(RELAYER, 7), PAYER_KEY).status == 1
    assert token.functions.allowance(PAYER, RELAYER).call() == 7
    assert_reverts(token.functions.transferFrom(PAYER, PAYEE, 8), "ERC20: transfer amount exceeds allowance")
    assert transact(w3, token.functions.transferFrom(PAYER, PAYEE, 7)).status == 1
    assert token.functions.allowance(PAYER, RELAYER).call() == 0
    assert token.functions.balanceOf(PAYER).call() == DEFAULT_MINT_ATOMIC - 12
    assert_reverts(token.functions.transfer(PAYEE, DEFAULT_MINT_ATOMIC), "ERC20: transfer amount exceeds balance", PAYER)


def test_only_the_deployer_mints(token: Contract) -> None:
    assert_reverts(token.functions.mint(PAYER, 1), "FiatToken: caller is not a minter", sender=PAYER)


# ------------------------------------------------------------------------------------ EIP-3009


def test_transfer_with_authorization_moves_funds_once(w3: Web3, token: Contract) -> None:
    auth = sign_authorization(token, PAYER_KEY, value=1_250_000)
    assert token.functions.authorizationState(PAYER, auth["nonce"]).call() is False

    receipt = transact(w3, token.functions.transferWithAuthorization(*auth_args(auth)))

    assert receipt.status == 1
    assert 50_000 < receipt.gasUsed < 100_000
    assert token.functions.authorizationState(PAYER, auth["nonce"]).call() is True
    assert token.functions.balanceOf(PAYER).call() == DEFAULT_MINT_ATOMIC - 1_250_000
    assert token.functions.balanceOf(PAYEE).call() == DEFAULT_MINT_ATOMIC + 1_250_000
    (used,) = token.events.AuthorizationUsed().process_receipt(receipt, errors=DISCARD)
    assert used.args.authorizer == PAYER and used.args.nonce == auth["nonce"]
    (transfer,) = token.events.Transfer().process_receipt(receipt, errors=DISCARD)
    assert (transfer.args["from"], transfer.args.to, transfer.args.value) == (PAYER, PAYEE, 1_250_000)

    # Replay: same authorization again.
    call = token.functions.transferWithAuthorization(*auth_args(auth))
    assert_reverts(call, "FiatTokenV2: authorization is used or canceled")
    assert transact(w3, call).status == 0


def test_transfer_with_authorization_bytes_signature_overload(w3: Web3, token: Contract) -> None:
    auth = sign_authorization(token, PAYER_KEY)
    args = auth_args(auth)[:6] + [packed_signature(auth)]
    fn = token.get_function_by_signature(
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
    )
    assert transact(w3, fn(*args)).status == 1
    assert token.functions.authorizationState(PAYER, auth["nonce"]).call() is True
    assert_reverts(fn(*args[:6], packed_signature(auth)[:64]), "FiatTokenV2: authorization is used or canceled")
    fresh = sign_authorization(token, PAYER_KEY)
    assert_reverts(fn(*auth_args(fresh)[:6], packed_signature(fresh)[:64]), "FiatTokenV2: invalid signature")


def test_expired_and_not_yet_valid(w3: Web3, token: Contract) -> None:
    now = latest_timestamp(w3)
    expired = sign_authorization(token, PAYER_KEY, valid_before=now)
    assert_reverts(token.functions.transferWithAuthorization(*auth_args(expired)), "FiatTokenV2: authorization is expired")
    early = sign_authorization(token, PAYER_KEY, valid_after=now + 3600, valid_before=now + 7200)
    assert_reverts(
        token.functions.transferWithAuthorization(*auth_args(early)), "FiatTokenV2: authorization is not yet valid"
    )


def test_validity_window_bounds_are_strict(w3: Web3, token: Contract) -> None:
    def mined_at(timestamp: int, auth: dict[str, Any]) -> int:
        w3.provider.make_request("evm_setNextBlockTimestamp", [timestamp])  # type: ignore[arg-type]
        return int(transact(w3, token.functions.transferWithAuthorization(*auth_args(auth))).status)

    t = latest_timestamp(w3) + 100
    assert mined_at(t, sign_authorization(token, PAYER_KEY, valid_after=t, valid_before=t + 10)) == 0
    assert mined_at(t + 1, sign_authorization(token, PAYER_KEY, valid_after=t, valid_before=t + 2)) == 1
    assert mined_at(t + 2, sign_authorization(token, PAYER_KEY, valid_after=t, valid_before=t + 2)) == 0
    assert mined_at(t + 3, sign_authorization(token, PAYER_KEY, valid_after=t, valid_before=t + 4)) == 1


def test_bad_signatures_are_refused(token: Contract) -> None:
    invalid = "FiatTokenV2: invalid signature"
    # Signed by someone other than `from`.
    forged = sign_authorization(token, ANVIL_KEYS[3]) | {"from": PAYER}
    assert_reverts(token.functions.transferWithAuthorization(*auth_args(forged)), invalid)
    # A field changed after signing.
    good = sign_authorization(token, PAYER_KEY)
    assert_reverts(token.functions.transferWithAuthorization(*auth_args(good | {"value": good["value"] + 1})), invalid)
    # The malleable twin (s -> n - s, v flipped) recovers to the same signer but is high-s.
    s = int.from_bytes(good["s"], "big")
    twin = good | {"s": (SECP256K1_N - s).to_bytes(32, "big"), "v": 55 - good["v"]}
    assert_reverts(token.functions.transferWithAuthorization(*auth_args(twin)), invalid)
    # v outside 27/28, and a signature that recovers to nobody.
    assert_reverts(token.functions.transferWithAuthorization(*auth_args(good | {"v": good["v"] - 27})), invalid)
    assert_reverts(token.functions.transferWithAuthorization(*auth_args(good | {"r": b"\0" * 32})), invalid)
    # A ReceiveWithAuthorization signature is not a TransferWithAuthorization one.
    receive = sign_authorization(token, PAYER_KEY, primary_type="ReceiveWithAuthorization")
    assert_reverts(token.functions.transferWithAuthorization(*auth_args(receive)), invalid)
    # The untouched original still works (nothing above consumed its nonce).
    token.functions.transferWithAuthorization(*auth_args(good)).call({"from": RELAYER})


def test_insufficient_balance(token: Contract) -> None:
    auth = sign_authorization(token, PAYER_KEY, value=DEFAULT_MINT_ATOMIC + 1)
    assert_reverts(token.functions.transferWithAuthorization(*auth_args(auth)), "ERC20: transfer amount exceeds balance")


def test_receive_with_authorization_only_by_the_payee(w3: Web3, token: Contract) -> None:
    auth = sign_authorization(token, PAYER_KEY, primary_type="ReceiveWithAuthorization")
    call = token.functions.receiveWithAuthorization(*auth_args(auth))
    assert_reverts(call, "FiatTokenV2: caller must be the payee", sender=RELAYER)
    assert transact(w3, call, ANVIL_KEYS[2]).status == 1
    assert token.functions.balanceOf(PAYEE).call() == DEFAULT_MINT_ATOMIC + auth["value"]
    assert token.functions.authorizationState(PAYER, auth["nonce"]).call() is True


def test_cancel_authorization(w3: Web3, token: Contract) -> None:
    auth = sign_authorization(token, PAYER_KEY)
    cancel = Account.sign_typed_data(
        PAYER_KEY,
        full_message={
            "types": {
                "EIP712Domain": DOMAIN_FIELDS,
                "CancelAuthorization": [
                    {"name": "authorizer", "type": "address"},
                    {"name": "nonce", "type": "bytes32"},
                ],
            },
            "primaryType": "CancelAuthorization",
            "domain": {"name": "USD Coin", "version": "2", "chainId": LOCAL_CHAIN_ID, "verifyingContract": token.address},
            "message": {"authorizer": PAYER, "nonce": auth["nonce"]},
        },
    )
    v, r, s = cancel.v, cancel.r.to_bytes(32, "big"), cancel.s.to_bytes(32, "big")
    # Only the authorizer's signature cancels.
    assert_reverts(token.functions.cancelAuthorization(ANVIL_ADDRESSES[3], auth["nonce"], v, r, s), "FiatTokenV2: invalid signature")

    receipt = transact(w3, token.functions.cancelAuthorization(PAYER, auth["nonce"], v, r, s))
    assert receipt.status == 1
    (canceled,) = token.events.AuthorizationCanceled().process_receipt(receipt, errors=DISCARD)
    assert canceled.args.authorizer == PAYER and canceled.args.nonce == auth["nonce"]
    assert token.functions.authorizationState(PAYER, auth["nonce"]).call() is True
    assert_reverts(
        token.functions.transferWithAuthorization(*auth_args(auth)), "FiatTokenV2: authorization is used or canceled"
    )
    assert_reverts(
        token.functions.cancelAuthorization(PAYER, auth["nonce"], v, r, s), "FiatTokenV2: authorization is used or canceled"
    )
    assert token.functions.balanceOf(PAYER).call() == DEFAULT_MINT_ATOMIC


# ------------------------------------------------------------------------------ run_devchain


def test_run_devchain_writes_the_deployment_and_stops_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "devchain.json"
    lines: list[str] = []
    stop = threading.Event()
    result: list[int] = []
    runner = threading.Thread(
        target=lambda: result.append(run_devchain(port=0, deployment_path=path, echo=lines.append, stop_event=stop))
    )
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while "Press Ctrl-C to stop." not in lines and runner.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        deployed = Deployment.read(path)
        assert deployed.token.address == DEFAULT_TOKEN_ADDRESS
        assert Web3(HTTPProvider(deployed.rpc_url)).eth.chain_id == LOCAL_CHAIN_ID
        assert any(deployed.rpc_url in line for line in lines)
    finally:
        stop.set()
        runner.join(30)
    assert result == [0]
