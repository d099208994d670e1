"""The committed TestUSDC artifact matches its source, and exposes the EIP-3009 surface."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACT = REPO / "contracts" / "build" / "TestUSDC.json"


def _abi() -> list[dict[str, Any]]:
    abi: list[dict[str, Any]] = json.loads(ARTIFACT.read_text(encoding="utf-8"))["abi"]
    return abi


def _signatures(kind: str) -> set[str]:
    return {
        f"{item['name']}({','.join(i['type'] for i in item['inputs'])})"
        for item in _abi()
        if item["type"] == kind
    }


def test_artifact_is_up_to_date_with_source() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (CI has it): cannot recompile contracts/TestUSDC.sol")
    if not (REPO / "node_modules" / "solc").is_dir():
        pytest.fail("node_modules/solc missing: run `npm ci` in the repository root")
    result = subprocess.run(
        [node, "contracts/compile.js", "--check"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_artifact_metadata() -> None:
    artifact = json.loads(ARTIFACT.read_text(encoding="utf-8"))
    assert list(artifact) == ["contractName", "abi", "bytecode", "compiler", "evmVersion"]
    assert artifact["contractName"] == "TestUSDC"
    assert artifact["compiler"] == "solc 0.8.37"
    assert artifact["evmVersion"] == "cancun"
    assert artifact["bytecode"].startswith("0x") and len(artifact["bytecode"]) > 1000


def test_abi_has_the_eip3009_surface() -> None:
    functions = _signatures("function")
    expected = {
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)",
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)",
        "receiveWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)",
        "receiveWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)",
        "cancelAuthorization(address,bytes32,uint8,bytes32,bytes32)",
        "cancelAuthorization(address,bytes32,bytes)",
        "authorizationState(address,bytes32)",
        "DOMAIN_SEPARATOR()",
        "TRANSFER_WITH_AUTHORIZATION_TYPEHASH()",
        "name()",
        "symbol()",
        "version()",
        "decimals()",
        "totalSupply()",
        "balanceOf(address)",
        "transfer(address,uint256)",
        "approve(address,uint256)",
        "allowance(address,address)",
        "transferFrom(address,address,uint256)",
        "mint(address,uint256)",
    }
    assert expected <= functions, expected - functions
    events = _signatures("event")
    assert {
        "AuthorizationUsed(address,bytes32)",
        "AuthorizationCanceled(address,bytes32)",
        "Transfer(address,address,uint256)",
        "Approval(address,address,uint256)",
    } <= events


@pytest.mark.parametrize("contract", ["TestUSDC", "BatchSettler"])
def test_packaged_artifacts_are_the_committed_build(contract: str) -> None:
    """What the devchain deploys (gateway/devkit/contracts/, package data: an installed wheel has
    it) is byte for byte contracts/build/ (what `node contracts/compile.js --check` checks)."""
    from gateway.devkit.devchain import ARTIFACT_DIR

    packaged = ARTIFACT_DIR / f"{contract}.json"
    assert packaged.read_bytes() == (REPO / "contracts" / "build" / f"{contract}.json").read_bytes(), (
        f"{packaged} differs from contracts/build/{contract}.json: run `node contracts/compile.js`"
    )
