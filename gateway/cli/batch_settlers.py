"""``x402gw deploy-batch-settlers``: one BatchSettler per settlement account, on any chain.

    x402gw deploy-batch-settlers --rpc-url URL --deployer-key-file FILE \\
        (--settlement-keys-file FILE | --settler 0x...)...

A BatchSettler (``contracts/BatchSettler.sol``, its compiled artifact shipped in ``gateway.devkit``) takes ``settle``
from the one account its constructor names. Batched settlement with ``serve --workers N`` needs one
per worker account, listed in ``X402GW_BATCH_SETTLEMENT``'s ``contracts``: this deploys them, one
line each as it lands, then prints that entry. The settlers come from the workers' own keys file
(only their addresses are read out of it) or are given as addresses. The deployer pays the gas; its
key is read from a file, never from the command line, and never printed; anvil's well-known dev
keys are refused on every chain but the local one. The RPC URL is printed scheme and host only.

Refusals, exit 2, with a code: ``invalid_argument``, ``secret_file_unreadable``, ``invalid_key``,
``dev_key_on_public_chain``, ``chain_unreachable``, ``artifact_missing``, ``transaction_failed``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from eth_account import Account
from web3 import HTTPProvider, Web3
from web3.exceptions import Web3Exception

from gateway.cli.workers import WorkerPlanError, read_keys
from gateway.devkit.devchain import deploy_batch_settler_with
from gateway.ops.doctor.findings import redact_url
from gateway.wiring import is_dev_key
from settlement.chain.deployment import LOCAL_CHAIN_ID, DevchainError

__all__ = ["deploy_batch_settlers"]

RECEIPT_TIMEOUT_SECONDS = 300


class Refused(Exception):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message, self.code = message, code


def _deployer(path: Path) -> str:
    try:
        keys = read_keys(path)
    except WorkerPlanError as exc:
        raise Refused(exc.message.replace("--settlement-keys-file", "--deployer-key-file"),
                      "secret_file_unreadable" if exc.code == "secret_file_unreadable" else "invalid_key") from None
    if len(keys) != 1:
        raise Refused(f"--deployer-key-file: one key expected, {len(keys)} found", "invalid_key")
    return keys[0]


def _settlers(keys_file: Path | None, addresses: tuple[str, ...]) -> list[str]:
    try:
        settlers = [Account.from_key(key).address for key in read_keys(keys_file)]
    except WorkerPlanError as exc:
        raise Refused(exc.message, "secret_file_unreadable" if exc.code == "secret_file_unreadable" else "invalid_key") from None
    for address in addresses:
        if not Web3.is_address(address) or not address.startswith("0x"):
            raise Refused(f"--settler {address!r} is not a 0x address", "invalid_argument")
        settlers.append(Web3.to_checksum_address(address))
    if not settlers:
        raise Refused("name the settlement accounts: --settlement-keys-file FILE or --settler 0x... (repeatable)",
                      "invalid_argument")
    if len({s.lower() for s in settlers}) != len(settlers):
        raise Refused("a settlement account is named twice (each needs its own BatchSettler)", "invalid_argument")
    return settlers


def run(rpc_url: str, deployer_key_file: Path, keys_file: Path | None, addresses: tuple[str, ...]) -> list[str]:
    key = _deployer(deployer_key_file)
    settlers = _settlers(keys_file, addresses)
    where = redact_url(rpc_url, keep_path=False)
    w3 = Web3(HTTPProvider(rpc_url, request_kwargs={"timeout": 30}))
    try:
        chain_id = int(w3.eth.chain_id)
    except (OSError, ValueError, Web3Exception) as exc:
        raise Refused(f"the RPC {where} did not answer ({type(exc).__name__})", "chain_unreachable") from None
    if chain_id != LOCAL_CHAIN_ID and is_dev_key(key):
        raise Refused(f"the deployer key is one of anvil's public dev keys; refused on eip155:{chain_id}",
                      "dev_key_on_public_chain")
    click.echo(f"deploying {len(settlers)} BatchSettler(s) on eip155:{chain_id} through {where}, "
               f"deployer {Account.from_key(key).address}")
    contracts: list[str] = []
    for number, settler in enumerate(settlers, 1):
        try:
            contract, tx_hash = deploy_batch_settler_with(w3, key, settler, receipt_timeout=RECEIPT_TIMEOUT_SECONDS)
        except DevchainError as exc:  # its code only: its message may quote the RPC URL
            done = f"; deployed so far: {', '.join(contracts)}" if contracts else ""
            raise Refused(f"the deployment for {settler} did not complete ({exc.code}){done}", exc.code) from None
        contracts.append(contract)
        click.echo(f"[{number}/{len(settlers)}] BatchSettler {contract} takes settlements from {settler} (tx {tx_hash})")
    click.echo("X402GW_BATCH_SETTLEMENT entry (one per worker; each worker takes the one naming its account):")
    click.echo(json.dumps({f"eip155:{chain_id}": {"contracts": contracts}}))
    return contracts


@click.command("deploy-batch-settlers")
@click.option("--rpc-url", required=True, help="The chain's RPC URL (printed scheme and host only).")
@click.option("--deployer-key-file", required=True, type=click.Path(path_type=Path),
              help="The key that pays for the deployments (a file with one 0x key).")
@click.option("--settlement-keys-file", "keys_file", default=None, type=click.Path(path_type=Path),
              help="The workers' keys file: a BatchSettler for each account in it (keys are only read, never printed).")
@click.option("--settler", "addresses", multiple=True, help="A settlement account's address (repeatable).")
def deploy_batch_settlers(rpc_url: str, deployer_key_file: Path, keys_file: Path | None, addresses: tuple[str, ...]) -> None:
    """Deploy one BatchSettler per settlement account (batched settlement with serve --workers)."""
    try:
        run(rpc_url, deployer_key_file, keys_file, addresses)
    except Refused as exc:
        click.echo(f"error: {exc.message} [{exc.code}]", err=True)
        sys.exit(2)
