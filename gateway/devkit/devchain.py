"""The local development chain: an anvil node with a USDC-like EIP-3009 token on it.

Used by `x402gw devchain` (``run_devchain``) and by the integration tests (``Anvil`` +
``setup_devchain``). The token is ``contracts/TestUSDC.sol``, compiled ahead of time into the
committed artifact ``contracts/build/TestUSDC.json``, so no compiler is needed at run time; the
artifacts are read from their copies in ``gateway/devkit/contracts/`` (package data, so an
installed wheel has them; ``contracts/compile.js`` writes and checks both copies).
Everything here uses public anvil dev keys: never point it at a real network.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import Any

from eth_account import Account
from web3 import HTTPProvider, Web3
from web3.exceptions import Web3Exception

from gateway.devkit.anvil import Anvil, find_anvil
from gateway.devkit.channels import place_channel_contracts
from gateway.devkit.permit2 import approve_permit2, place_exact_proxy, place_upto_contracts
from settlement.chain.deployment import (
    ANVIL_ADDRESSES,
    ANVIL_KEYS,
    ANVIL_MNEMONIC,
    DEFAULT_DEPLOYMENT_PATH,
    DEFAULT_TOKEN_ADDRESS,
    LOCAL_CHAIN_ID,
    LOCAL_NETWORK,
    Deployment,
    DevchainError,
    FundedAccount,
    TokenInfo,
)
from settlement.schemes import MULTICALL3_ADDRESS

__all__ = [
    "ANVIL_ADDRESSES",
    "ANVIL_KEYS",
    "ANVIL_MNEMONIC",
    "DEFAULT_DEPLOYMENT_PATH",
    "DEFAULT_MINT_ATOMIC",
    "DEFAULT_TOKEN_ADDRESS",
    "LOCAL_CHAIN_ID",
    "LOCAL_NETWORK",
    "Anvil",
    "Deployment",
    "DevchainError",
    "FundedAccount",
    "TokenInfo",
    "deploy_batch_settler",
    "deploy_batch_settler_with",
    "deploy_plain_token",
    "deploy_token",
    "deploy_wallet_contracts",
    "find_anvil",
    "load_token_artifact",
    "mint",
    "run_devchain",
    "setup_devchain",
]

ARTIFACT_DIR = Path(__file__).resolve().parent / "contracts"  # package data, = contracts/build/
TOKEN_ARTIFACT_PATH = ARTIFACT_DIR / "TestUSDC.json"
BATCH_SETTLER_ARTIFACT_PATH = ARTIFACT_DIR / "BatchSettler.json"

DEFAULT_MINT_ATOMIC = 1_000_000_000  # 1000 USDC at 6 decimals
_RECEIPT_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------------------- token


def load_token_artifact() -> dict[str, Any]:
    """The committed compile output of contracts/TestUSDC.sol: abi, bytecode, compiler."""
    try:
        artifact: dict[str, Any] = json.loads(TOKEN_ARTIFACT_PATH.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DevchainError(
            f"token artifact missing at {TOKEN_ARTIFACT_PATH}: run `node contracts/compile.js`",
            code="artifact_missing",
        ) from exc
    return artifact


def deploy_batch_settler(rpc_url: str, settler: str, deployer_key: str = ANVIL_KEYS[0]) -> str:
    """Deploy BatchSettler (contracts/BatchSettler.sol) callable only by ``settler``."""
    return _deploy_batch_settler(_web3(rpc_url), deployer_key, settler)


def _deploy_batch_settler(w3: Web3, deployer_key: str, settler: str) -> str:
    return deploy_batch_settler_with(w3, deployer_key, settler)[0]


def deploy_batch_settler_with(w3: Web3, deployer_key: str, settler: str, *,
                              receipt_timeout: float = _RECEIPT_TIMEOUT_S) -> tuple[str, str]:
    """BatchSettler for ``settler``, deployed through ``w3`` on any chain (``x402gw
    deploy-batch-settlers``): its address and the deployment's transaction hash. ``DevchainError``
    (``artifact_missing``, ``chain_unreachable``, ``transaction_failed``) otherwise; its message may
    name the provider, so a caller facing a real RPC URL reports the code only."""
    try:
        artifact = json.loads(BATCH_SETTLER_ARTIFACT_PATH.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DevchainError(
            f"artifact missing at {BATCH_SETTLER_ARTIFACT_PATH}: run `node contracts/compile.js`", code="artifact_missing"
        ) from exc
    deployer = Account.from_key(deployer_key).address
    factory = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    tx = _build(w3, factory.constructor(Web3.to_checksum_address(settler)), deployer, _nonce(w3, deployer))
    receipt = _send(w3, tx, deployer_key, "batch settler deployment", timeout=receipt_timeout)
    return Web3.to_checksum_address(receipt["contractAddress"]), receipt["transactionHash"].to_0x_hex()


def load_artifact(contract: str) -> dict[str, Any]:
    """The committed compile output of one of contracts/*.sol's contracts (package data)."""
    path = ARTIFACT_DIR / f"{contract}.json"
    try:
        artifact: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DevchainError(f"artifact missing at {path}: run `node contracts/compile.js`", code="artifact_missing") from exc
    return artifact


def _deploy(w3: Web3, deployer_key: str, contract: str, *args: Any) -> str:
    artifact = load_artifact(contract)
    deployer = Account.from_key(deployer_key).address
    factory = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    receipt = _send(w3, _build(w3, factory.constructor(*args), deployer, _nonce(w3, deployer)), deployer_key,
                    f"{contract} deployment")
    return Web3.to_checksum_address(receipt["contractAddress"])


def deploy_wallet_contracts(rpc_url: str, deployer_key: str = ANVIL_KEYS[0]) -> tuple[str, str, str]:
    """Smart-wallet support on an anvil chain: the SmartWalletFactory (ERC-6492 factory), the
    EIP-7702 delegate, and Multicall3's code at its canonical address (anvil_setCode of a deployed
    copy: the gateway's 6492 check calls it there, as on public chains). Returns the three addresses."""
    return _deploy_wallet_contracts(_web3(rpc_url), deployer_key)


def _deploy_wallet_contracts(w3: Web3, deployer_key: str) -> tuple[str, str, str]:
    factory = _deploy(w3, deployer_key, "SmartWalletFactory")
    delegate = _deploy(w3, deployer_key, "Eip7702Delegate")
    copy = _deploy(w3, deployer_key, "Multicall3")
    try:
        code = w3.eth.get_code(Web3.to_checksum_address(copy))
        w3.provider.make_request("anvil_setCode", [MULTICALL3_ADDRESS, "0x" + bytes(code).hex()])  # type: ignore[arg-type]
    except (OSError, Web3Exception) as exc:
        raise DevchainError(f"could not place Multicall3 on the dev chain: {exc}", code="transaction_failed") from exc
    return factory, delegate, MULTICALL3_ADDRESS


def _web3(rpc_url: str) -> Web3:
    return Web3(HTTPProvider(rpc_url, request_kwargs={"timeout": 10}))


def _send(w3: Web3, tx: dict[str, Any], private_key: str, what: str, timeout: float = _RECEIPT_TIMEOUT_S) -> dict[str, Any]:
    """Sign, send and wait for one transaction; a revert is a DevchainError."""
    try:
        signed = Account.sign_transaction(tx, private_key)
        tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
        receipt = dict(w3.eth.wait_for_transaction_receipt(tx_hash, timeout=timeout))
    except (OSError, Web3Exception) as exc:
        raise DevchainError(f"{what} failed at {w3.provider!r}: {exc}", code="transaction_failed") from exc
    if receipt.get("status") != 1:
        raise DevchainError(f"{what} reverted (tx {tx_hash.to_0x_hex()})", code="transaction_failed")
    return receipt


def _build(w3: Web3, call: Any, sender: str, nonce: int) -> dict[str, Any]:
    try:
        tx: dict[str, Any] = call.build_transaction({"from": sender, "nonce": nonce, "chainId": w3.eth.chain_id})
    except (OSError, Web3Exception) as exc:
        raise DevchainError(f"could not prepare a transaction on the dev chain: {exc}", code="chain_unreachable") from exc
    return tx


def deploy_token(
    rpc_url: str,
    deployer_key: str = ANVIL_KEYS[0],
    name: str = "USD Coin",
    symbol: str = "USDC",
    version: str = "2",
) -> str:
    """Deploy TestUSDC; returns its checksum address (DEFAULT_TOKEN_ADDRESS on a fresh anvil)."""
    address, _ = _deploy_token(_web3(rpc_url), deployer_key, name, symbol, version)
    return address


def _deploy_token(w3: Web3, deployer_key: str, name: str, symbol: str, version: str) -> tuple[str, int]:
    artifact = load_token_artifact()
    deployer = Account.from_key(deployer_key).address
    factory = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    nonce = _nonce(w3, deployer)
    tx = _build(w3, factory.constructor(name, symbol, version), deployer, nonce)
    receipt = _send(w3, tx, deployer_key, "token deployment")
    return Web3.to_checksum_address(receipt["contractAddress"]), int(receipt["gasUsed"])


def mint(
    rpc_url: str,
    token: str,
    to_addresses: Iterable[str],
    amount_atomic: int,
    minter_key: str = ANVIL_KEYS[0],
) -> None:
    """Mint ``amount_atomic`` (6-decimal units) of the token to each address."""
    _mint(_web3(rpc_url), token, to_addresses, amount_atomic, minter_key)


def _mint(w3: Web3, token: str, to_addresses: Iterable[str], amount_atomic: int, minter_key: str) -> None:
    if amount_atomic <= 0:
        raise ValueError("amount_atomic must be positive")
    contract = w3.eth.contract(address=Web3.to_checksum_address(token), abi=load_token_artifact()["abi"])
    minter = Account.from_key(minter_key).address
    nonce = _nonce(w3, minter)
    for to in to_addresses:
        call = contract.functions.mint(Web3.to_checksum_address(to), amount_atomic)
        _send(w3, _build(w3, call, minter, nonce), minter_key, f"mint to {to}")
        nonce += 1


def _nonce(w3: Web3, address: str) -> int:
    try:
        return int(w3.eth.get_transaction_count(Web3.to_checksum_address(address), "pending"))
    except (OSError, Web3Exception) as exc:
        raise DevchainError(f"dev chain not reachable: {exc}", code="chain_unreachable") from exc


# ---------------------------------------------------------------------------------- deployment


def setup_devchain(rpc_url: str, mint_atomic: int = DEFAULT_MINT_ATOMIC) -> Deployment:
    """Deploy the token with account 0 and mint ``mint_atomic`` to accounts 1..9."""
    w3 = _web3(rpc_url)
    try:
        chain_id = int(w3.eth.chain_id)
    except (OSError, Web3Exception) as exc:
        raise DevchainError(f"dev chain not reachable at {rpc_url}: {exc}", code="chain_unreachable") from exc
    name, symbol, version, decimals = "USD Coin", "USDC", "2", 6
    token, _ = _deploy_token(w3, ANVIL_KEYS[0], name, symbol, version)
    token_info = TokenInfo(address=token, name=name, symbol=symbol, version=version, decimals=decimals)
    return fund_and_deploy(w3, rpc_url, chain_id, token_info, mint_atomic)


def fund_and_deploy(
    w3: Web3, rpc_url: str, chain_id: int, token: TokenInfo, mint_atomic: int, *, rehearsal: str | None = None,
) -> Deployment:
    """With ``token`` in place: mint ``mint_atomic`` to accounts 1..9, then deploy the batch settler
    and the wallet contracts (in this order, so a fresh anvil's addresses never change), and describe
    the chain. The dev chain and a rehearsal (``gateway.devkit.rehearsal``) both end here."""
    _mint(w3, token.address, ANVIL_ADDRESSES[1:], mint_atomic, ANVIL_KEYS[0])
    batch_settler = _deploy_batch_settler(w3, ANVIL_KEYS[0], ANVIL_ADDRESSES[0])
    # Last, so the token and the batch settler keep their addresses.
    wallet_factory, delegate, multicall3 = _deploy_wallet_contracts(w3, ANVIL_KEYS[0])
    # Code and storage only (anvil_setCode/setStorageAt): no transaction, nothing else moves.
    permit2, upto_proxy = place_upto_contracts(w3, load_artifact)
    approve_permit2(w3, token.address, ANVIL_ADDRESSES[1:])
    channel_escrow = place_channel_contracts(w3, load_artifact)
    exact_proxy = place_exact_proxy(w3, load_artifact)
    plain = deploy_plain_token(w3, ANVIL_KEYS[0], ANVIL_ADDRESSES[1:], mint_atomic)
    return Deployment(
        rpc_url=rpc_url,
        chain_id=chain_id,
        network=f"eip155:{chain_id}",
        token=token,
        deployer=ANVIL_ADDRESSES[0],
        settlement_key=ANVIL_KEYS[0],
        accounts=[
            FundedAccount(index=i, address=ANVIL_ADDRESSES[i], private_key=ANVIL_KEYS[i], usdc_atomic=mint_atomic)
            for i in range(1, len(ANVIL_KEYS))
        ],
        batch_settler=batch_settler,
        rehearsal=rehearsal,
        wallet_factory=wallet_factory,
        eip7702_delegate=delegate,
        multicall3=multicall3,
        permit2=permit2,
        upto_proxy=upto_proxy,
        channel_escrow=channel_escrow,
        exact_proxy=exact_proxy,
        plain_token=plain,
    )


PLAIN_TOKEN = ("Plain Dollar", "PUSD", 6)  # name, symbol, decimals; no version: no EIP-712 domain
_PLAIN_ALLOWANCES_SLOT = 4  # contracts/PlainToken.sol's allowance mapping


def deploy_plain_token(w3: Web3, deployer_key: str, holders: Iterable[str], amount: int) -> TokenInfo:
    """A plain ERC-20 without EIP-3009 (``contracts/PlainToken.sol``), ``amount`` minted to each of
    ``holders`` by its constructor (one transaction), each of whom has approved Permit2 on it
    (storage, as for the test token): x402 ``exact`` pays it through Permit2 only."""
    name, symbol, decimals = PLAIN_TOKEN
    owners = [Web3.to_checksum_address(h) for h in holders]
    address = _deploy(w3, deployer_key, "PlainToken", name, symbol, decimals, owners, amount)
    approve_permit2(w3, address, owners, allowances_slot=_PLAIN_ALLOWANCES_SLOT)
    return TokenInfo(address=address, name=name, symbol=symbol, version="", decimals=decimals)


# ---------------------------------------------------------------------------------------- CLI


def run_devchain(
    port: int = 8545,
    deployment_path: str | os.PathLike[str] = DEFAULT_DEPLOYMENT_PATH,
    anvil_path: str | None = None,
    echo: Callable[[str], object] = print,
    mint_atomic: int = DEFAULT_MINT_ATOMIC,
    stop_event: threading.Event | None = None,
    chain_id: int = LOCAL_CHAIN_ID,
    setup: Callable[[str, int], Deployment] | None = None,
) -> int:
    """Run a dev chain in the foreground until Ctrl-C, SIGTERM or ``stop_event``; returns the
    exit code (0 after a clean stop, 1 if the chain could not be started or died). ``chain_id``
    and ``setup`` (rpc_url, mint_atomic → deployment): a rehearsal (gateway.devkit.rehearsal)."""
    stop = stop_event if stop_event is not None else threading.Event()
    previous: dict[int, Any] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Signal handlers can only be installed from the main thread; elsewhere the caller stops us.
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, on_signal)
    anvil = Anvil(port, anvil_path=anvil_path, chain_id=chain_id)
    try:
        anvil.start()
        deployment = (setup or setup_devchain)(anvil.rpc_url, mint_atomic)
        deployment.write(deployment_path)
        for line in _summary(deployment, Path(deployment_path)):
            echo(line)
        while not stop.wait(0.5):
            if not anvil.running:
                echo(f"anvil stopped unexpectedly\n{anvil.output_tail()}")
                return 1
        echo("stopping the dev chain")
        return 0
    except DevchainError as exc:
        echo(f"devchain error ({exc.code}): {exc}")
        return 1
    finally:
        anvil.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _summary(deployment: Deployment, path: Path) -> list[str]:
    token = deployment.token
    lines = [
        f"x402gw dev chain (anvil, {deployment.network})",
        f"  RPC URL      {deployment.rpc_url}",
        f"  token        {token.name} ({token.symbol}, version {token.version}, {token.decimals} decimals)",
        f"               {token.address}",
        f"  settlement   {deployment.deployer} (anvil account 0, pays settlement gas)",
        f"  batch        {deployment.batch_settler} (BatchSettler, batched settlement)",
        f"  wallets      {deployment.wallet_factory} (SmartWalletFactory, ERC-1271 wallets, ERC-6492 factory)",
        f"               {deployment.eip7702_delegate} (EIP-7702 delegate)",
        *([f"  plain token  {deployment.plain_token.address} ({deployment.plain_token.symbol}: no EIP-3009, "
           "x402 exact through Permit2)"] if deployment.plain_token else []),
        f"  deployment   {path}",
        "  funded accounts (public anvil dev keys):",
    ]
    if deployment.rehearsal:
        lines[1:1] = [f"  rehearsal    of {deployment.rehearsal}: its chain id, its USDC's address, name and version "
                      "(anvil dev keys: never a real network)"]
    for account in deployment.accounts:
        amount = _format_usdc(account.usdc_atomic, token.decimals)
        lines.append(f"    [{account.index}] {account.address}  {amount} {token.symbol}  key {account.private_key}")
    lines.append("Press Ctrl-C to stop.")
    return lines


def _format_usdc(atomic: int, decimals: int) -> str:
    whole, fraction = divmod(atomic, 10**decimals)
    return f"{whole}.{fraction:0{decimals}d}".rstrip("0").rstrip(".") if fraction else str(whole)
