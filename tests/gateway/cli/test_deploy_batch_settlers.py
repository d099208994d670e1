"""``x402gw deploy-batch-settlers`` on real anvils: one BatchSettler per settlement account, each
naming its account as its settler, and the X402GW_BATCH_SETTLEMENT entry printed; anvil's dev keys
refused as the deployer off the local chain; bad arguments refused with a code, no key and no RPC
secret ever printed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from eth_account import Account
from web3 import HTTPProvider, Web3

from gateway.cli.main import main
from gateway.devkit.anvil import Anvil
from gateway.devkit.devchain import ANVIL_KEYS
from settlement.schemes.batch_settlers import SEL_SETTLER
from tests.conftest import Devchain
from tests.support.facilitator_double import closed_port_url


def key_file(path: Path, *keys: str) -> Path:
    path.write_text("".join(key + "\n" for key in keys))
    return path


def deploy(rpc_url: str, deployer: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["deploy-batch-settlers", "--rpc-url", rpc_url, "--deployer-key-file", str(deployer), *args])


def settler_of(w3: Web3, contract: str) -> str:
    word = w3.eth.call({"to": Web3.to_checksum_address(contract), "data": SEL_SETTLER})  # type: ignore[typeddict-item]
    return Web3.to_checksum_address(word[12:])


def refused(result: Result, code: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.strip().endswith(f"[{code}]"), result.output
    return result.output


def test_one_batch_settler_per_worker_account(tmp_path: Path, devchain: Devchain) -> None:
    workers = [Account.create() for _ in range(2)]
    keys = key_file(tmp_path / "workers.txt", *("0x" + bytes(w.key).hex() for w in workers))
    extra = Account.create().address
    result = deploy(devchain.anvil.rpc_url, key_file(tmp_path / "deployer", ANVIL_KEYS[8]),
                    "--settlement-keys-file", str(keys), "--settler", extra.lower())
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert [line.split("]")[0] for line in lines if line.startswith("[")] == ["[1/3", "[2/3", "[3/3"]
    contracts = json.loads(lines[-1])["eip155:31337"]["contracts"]
    w3 = Web3(HTTPProvider(devchain.anvil.rpc_url))
    assert [settler_of(w3, c) for c in contracts] == [workers[0].address, workers[1].address, extra]
    assert not any(bytes(w.key).hex() in result.output for w in workers) and ANVIL_KEYS[8][2:] not in result.output


@pytest.fixture(scope="module")
def public_like() -> Iterator[Anvil]:
    """An anvil serving Base Sepolia's chain id: not the local chain, as far as keys go."""
    with Anvil(chain_id=84532) as anvil:
        yield anvil


def test_a_dev_key_deploys_nothing_off_the_local_chain(tmp_path: Path, public_like: Anvil) -> None:
    w3 = Web3(HTTPProvider(public_like.rpc_url))
    deployer = Account.from_key(ANVIL_KEYS[8]).address
    before = w3.eth.get_transaction_count(deployer)
    output = refused(deploy(public_like.rpc_url, key_file(tmp_path / "deployer", ANVIL_KEYS[8]),
                            "--settler", Account.create().address), "dev_key_on_public_chain")
    assert "eip155:84532" in output and w3.eth.get_transaction_count(deployer) == before
    # a key of one's own, holding gas, deploys there
    own = Account.create()
    w3.provider.make_request("anvil_setBalance", [own.address, hex(10**20)])  # type: ignore[arg-type]
    settler = Account.create().address
    result = deploy(public_like.rpc_url, key_file(tmp_path / "own", "0x" + bytes(own.key).hex()), "--settler", settler)
    assert result.exit_code == 0, result.output
    [contract] = json.loads(result.output.strip().splitlines()[-1])["eip155:84532"]["contracts"]
    assert settler_of(w3, contract) == settler


def test_bad_arguments_are_refused_with_a_code(tmp_path: Path, devchain: Devchain) -> None:
    deployer = key_file(tmp_path / "deployer", ANVIL_KEYS[8])
    refused(deploy(devchain.anvil.rpc_url, deployer), "invalid_argument")  # no settler named
    refused(deploy(devchain.anvil.rpc_url, deployer, "--settler", "0x1234"), "invalid_argument")
    same = Account.create().address
    refused(deploy(devchain.anvil.rpc_url, deployer, "--settler", same, "--settler", same.lower()), "invalid_argument")
    refused(deploy(devchain.anvil.rpc_url, tmp_path / "absent", "--settler", same), "secret_file_unreadable")
    output = refused(deploy(devchain.anvil.rpc_url, key_file(tmp_path / "two", ANVIL_KEYS[8], ANVIL_KEYS[7]),
                            "--settler", same), "invalid_key")
    assert ANVIL_KEYS[7][2:] not in output
    dead = closed_port_url() + "/v2/SECRET-API-KEY"
    output = refused(deploy(dead, deployer, "--settler", same), "chain_unreachable")
    assert "SECRET-API-KEY" not in output
