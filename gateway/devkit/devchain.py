"""The local development chain: an anvil node with a USDC-like EIP-3009 token on it.

Used by `x402gw devchain` (``run_devchain``) and by the integration tests (``Anvil`` +
``setup_devchain``). The token is ``contracts/TestUSDC.sol``, compiled ahead of time into the
committed artifact ``contracts/build/TestUSDC.json``, so no compiler is needed at run time.
Everything here uses public anvil dev keys: never point it at a real network.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from eth_account import Account
from web3 import HTTPProvider, Web3
from web3.exceptions import Web3Exception

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
    "deploy_token",
    "find_anvil",
    "load_token_artifact",
    "mint",
    "run_devchain",
    "setup_devchain",
]

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
TOKEN_ARTIFACT_PATH = REPO_ROOT / "contracts" / "build" / "TestUSDC.json"
BATCH_SETTLER_ARTIFACT_PATH = REPO_ROOT / "contracts" / "build" / "BatchSettler.json"

DEFAULT_MINT_ATOMIC = 1_000_000_000  # 1000 USDC at 6 decimals

_LISTENING = re.compile(r"Listening on ([0-9.]+|\[[0-9a-fA-F:]+\]):(\d+)")
_RECEIPT_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------------------- anvil


def find_anvil(explicit: str | None = None) -> str:
    """Path of the anvil binary: the explicit setting, else PATH, else the npm copy."""
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit
        raise DevchainError(
            f"anvil not found or not executable at {explicit!r} (the configured path)",
            code="anvil_not_found",
        )
    on_path = shutil.which("anvil")
    if on_path:
        return on_path
    npm_copy = REPO_ROOT / "node_modules" / ".bin" / "anvil"
    if npm_copy.is_file() and os.access(npm_copy, os.X_OK):
        return str(npm_copy)
    raise DevchainError(
        "anvil not found: run `npm ci` in the repository root (Linux x64), or install Foundry "
        "and put anvil on PATH, or configure the path to the anvil binary",
        code="anvil_not_found",
    )


class Anvil:
    """An anvil child process on 127.0.0.1, chain id 31337.

    ``port=0`` lets the OS pick a free port, read back from anvil's ``Listening on`` line.
    Use as a context manager, or call ``start()`` and ``stop()``.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        port: int = 0,
        *,
        anvil_path: str | None = None,
        block_time: float | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 15.0,
    ) -> None:
        self._requested_port = port
        self._anvil_path = anvil_path
        self._block_time = block_time
        self._extra_args = tuple(extra_args)
        self._startup_timeout = startup_timeout
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._output: collections.deque[str] = collections.deque(maxlen=200)
        self._listening = threading.Event()
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise DevchainError("anvil is not running", code="anvil_start_failed")
        return self._port

    @property
    def rpc_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        cmd = [
            find_anvil(self._anvil_path),
            "--host",
            self.host,
            "--port",
            str(self._requested_port),
            "--chain-id",
            str(LOCAL_CHAIN_ID),
        ]
        if self._block_time is not None:
            cmd += ["--block-time", _format_seconds(self._block_time)]
        # Never --quiet: the `Listening on` line is how a port-0 start learns its port.
        return cmd + list(self._extra_args)

    def start(self) -> Anvil:
        if self._process is not None:
            raise DevchainError("anvil already started", code="anvil_start_failed")
        cmd = self.command()
        try:
            self._process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                bufsize=1,
                # Own process group: a terminal's Ctrl-C reaches us, not anvil; we stop it.
                start_new_session=True,
            )
        except OSError as exc:
            raise DevchainError(f"could not start anvil ({cmd[0]}): {exc}", code="anvil_start_failed") from exc
        self._reader = threading.Thread(target=self._drain, name="anvil-stdout", daemon=True)
        self._reader.start()
        try:
            self._wait_ready(time.monotonic() + self._startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            self._signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(process, signal.SIGKILL)
                process.wait()
        if self._reader is not None:
            self._reader.join(timeout)
        if process.stdout is not None:
            process.stdout.close()
        self._port = None

    def output_tail(self, lines: int = 20) -> str:
        return "\n".join(list(self._output)[-lines:])

    def __enter__(self) -> Anvil:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # Reads anvil's output for as long as it runs, so the pipe never fills and blocks anvil.
    def _drain(self) -> None:
        process = self._process
        if process is None or process.stdout is None:
            return
        for line in process.stdout:
            line = line.rstrip("\n")
            self._output.append(line)
            if not self._listening.is_set():
                match = _LISTENING.search(line)
                if match:
                    self._port = int(match.group(2))
                    self._listening.set()

    def _wait_ready(self, deadline: float) -> None:
        process = self._process
        assert process is not None
        while not self._listening.wait(0.02):
            if process.poll() is not None:
                self._reader_join()
                raise self._start_failed(f"anvil exited with status {process.returncode}")
            if time.monotonic() > deadline:
                raise self._start_failed("anvil did not report its port in time")
        request = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}).encode()
        while True:
            chain_id = _query_chain_id(self.rpc_url, request)
            if chain_id is not None:
                if chain_id != LOCAL_CHAIN_ID:
                    raise self._start_failed(f"anvil answered chain id {chain_id}, expected {LOCAL_CHAIN_ID}")
                return
            if process.poll() is not None:
                self._reader_join()
                raise self._start_failed(f"anvil exited with status {process.returncode}")
            if time.monotonic() > deadline:
                raise self._start_failed("anvil did not answer eth_chainId in time")
            time.sleep(0.01)  # poll interval, bounded by the deadline above

    def _reader_join(self) -> None:
        if self._reader is not None:
            self._reader.join(1.0)

    def _start_failed(self, reason: str) -> DevchainError:
        tail = self.output_tail()
        detail = f"\n--- anvil output ---\n{tail}" if tail else ""
        return DevchainError(f"{reason}{detail}", code="anvil_start_failed")

    @staticmethod
    def _signal_group(process: subprocess.Popen[str], sig: signal.Signals) -> None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass


def _query_chain_id(rpc_url: str, request: bytes) -> int | None:
    http_request = urllib.request.Request(rpc_url, data=request, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(http_request, timeout=1.0) as response:
            return int(json.load(response)["result"], 16)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _format_seconds(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))


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
    try:
        artifact = json.loads(BATCH_SETTLER_ARTIFACT_PATH.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DevchainError(
            f"artifact missing at {BATCH_SETTLER_ARTIFACT_PATH}: run `node contracts/compile.js`", code="artifact_missing"
        ) from exc
    deployer = Account.from_key(deployer_key).address
    factory = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    tx = _build(w3, factory.constructor(Web3.to_checksum_address(settler)), deployer, _nonce(w3, deployer))
    receipt = _send(w3, tx, deployer_key, "batch settler deployment")
    return Web3.to_checksum_address(receipt["contractAddress"])


def _web3(rpc_url: str) -> Web3:
    return Web3(HTTPProvider(rpc_url, request_kwargs={"timeout": 10}))


def _send(w3: Web3, tx: dict[str, Any], private_key: str, what: str) -> dict[str, Any]:
    """Sign, send and wait for one transaction; a revert is a DevchainError."""
    try:
        signed = Account.sign_transaction(tx, private_key)
        tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
        receipt = dict(w3.eth.wait_for_transaction_receipt(tx_hash, timeout=_RECEIPT_TIMEOUT_S))
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
    _mint(w3, token, ANVIL_ADDRESSES[1:], mint_atomic, ANVIL_KEYS[0])
    # After the token and the mints, so the token keeps DEFAULT_TOKEN_ADDRESS.
    batch_settler = _deploy_batch_settler(w3, ANVIL_KEYS[0], ANVIL_ADDRESSES[0])
    return Deployment(
        rpc_url=rpc_url,
        chain_id=chain_id,
        network=f"eip155:{chain_id}",
        token=TokenInfo(address=token, name=name, symbol=symbol, version=version, decimals=decimals),
        deployer=ANVIL_ADDRESSES[0],
        settlement_key=ANVIL_KEYS[0],
        accounts=[
            FundedAccount(index=i, address=ANVIL_ADDRESSES[i], private_key=ANVIL_KEYS[i], usdc_atomic=mint_atomic)
            for i in range(1, len(ANVIL_KEYS))
        ],
        batch_settler=batch_settler,
    )


# ---------------------------------------------------------------------------------------- CLI


def run_devchain(
    port: int = 8545,
    deployment_path: str | os.PathLike[str] = DEFAULT_DEPLOYMENT_PATH,
    anvil_path: str | None = None,
    echo: Callable[[str], object] = print,
    mint_atomic: int = DEFAULT_MINT_ATOMIC,
    stop_event: threading.Event | None = None,
) -> int:
    """Run a dev chain in the foreground until Ctrl-C, SIGTERM or ``stop_event``; returns the
    exit code (0 after a clean stop, 1 if the chain could not be started or died)."""
    stop = stop_event if stop_event is not None else threading.Event()
    previous: dict[int, Any] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Signal handlers can only be installed from the main thread; elsewhere the caller stops us.
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, on_signal)
    anvil = Anvil(port, anvil_path=anvil_path)
    try:
        anvil.start()
        deployment = setup_devchain(anvil.rpc_url, mint_atomic=mint_atomic)
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
        f"  deployment   {path}",
        "  funded accounts (public anvil dev keys):",
    ]
    for account in deployment.accounts:
        amount = _format_usdc(account.usdc_atomic, token.decimals)
        lines.append(f"    [{account.index}] {account.address}  {amount} {token.symbol}  key {account.private_key}")
    lines.append("Press Ctrl-C to stop.")
    return lines


def _format_usdc(atomic: int, decimals: int) -> str:
    whole, fraction = divmod(atomic, 10**decimals)
    return f"{whole}.{fraction:0{decimals}d}".rstrip("0").rstrip(".") if fraction else str(whole)
