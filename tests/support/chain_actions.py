"""What an attacker (or a payer racing the gateway) does on chain, for attack tests: move a payer's
whole balance away, cancel or use an authorization directly, fund fresh keys. Synchronous web3 on
the test anvil (safe to call from an upstream hook's worker thread)."""

from __future__ import annotations

from typing import Any

from coincurve import PrivateKey
from eth_abi import encode as abi_encode
from eth_account import Account
from eth_hash.auto import keccak
from web3 import Web3

from settlement.chain.client import SEL_BALANCE_OF, SEL_TRANSFER, selector
from settlement.schemes.eip712 import domain_separator

SEL_CANCEL_AUTHORIZATION = selector("cancelAuthorization(address,bytes32,uint8,bytes32,bytes32)")
SEL_TRANSFER_WITH_AUTHORIZATION = selector(
    "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
)
CANCEL_TYPEHASH = keccak(b"CancelAuthorization(address authorizer,bytes32 nonce)")


def _send(w3: Web3, key: str, to: str, data: bytes) -> dict[str, Any]:
    account = Account.from_key(key)
    tx = {
        "from": account.address, "to": Web3.to_checksum_address(to), "data": data,
        "nonce": w3.eth.get_transaction_count(account.address, "pending"),
        "gas": 300_000, "gasPrice": w3.eth.gas_price, "chainId": w3.eth.chain_id,
    }
    signed = account.sign_transaction(tx)
    tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30)
    return dict(receipt)


def balance_of(w3: Web3, token: str, owner: str) -> int:
    data = SEL_BALANCE_OF + abi_encode(["address"], [owner])
    return int.from_bytes(w3.eth.call({"to": Web3.to_checksum_address(token), "data": data}), "big")


def transfer(w3: Web3, token: str, key: str, to: str, amount: int) -> dict[str, Any]:
    receipt = _send(w3, key, token, SEL_TRANSFER + abi_encode(["address", "uint256"], [to, amount]))
    assert receipt["status"] == 1, receipt
    return receipt


def drain(w3: Web3, token: str, key: str, sink: str) -> int:
    """Move all of ``key``'s tokens to ``sink``; returns how much moved."""
    owner = Account.from_key(key).address
    amount = balance_of(w3, token, owner)
    if amount:
        transfer(w3, token, key, sink, amount)
    assert balance_of(w3, token, owner) == 0
    return amount


def set_eth(w3: Web3, address: str, wei: int = 10**18) -> None:
    w3.provider.make_request("anvil_setBalance", [address, hex(wei)])  # type: ignore[arg-type]


def fresh_payer(w3: Web3, token: str, funder_key: str, amount: int) -> str:
    """A new key holding ``amount`` tokens (from ``funder_key``) and gas money; returns the key."""
    account = Account.create()
    key = "0x" + bytes(account.key).hex()
    transfer(w3, token, funder_key, account.address, amount)
    set_eth(w3, account.address)
    return key


def cancel_authorization(w3: Web3, token: str, name: str, version: str, key: str, nonce_hex: str) -> dict[str, Any]:
    """The payer cancels its own authorization on chain (EIP-3009 ``cancelAuthorization``)."""
    authorizer = Account.from_key(key).address
    nonce = bytes.fromhex(nonce_hex.removeprefix("0x"))
    domain = domain_separator(name, version, int(w3.eth.chain_id), token)
    struct = keccak(CANCEL_TYPEHASH + abi_encode(["address", "bytes32"], [authorizer, nonce]))
    digest = keccak(b"\x19\x01" + domain + struct)
    sig = PrivateKey(bytes.fromhex(key.removeprefix("0x"))).sign_recoverable(digest, hasher=None)
    data = SEL_CANCEL_AUTHORIZATION + abi_encode(
        ["address", "bytes32", "uint8", "bytes32", "bytes32"], [authorizer, nonce, sig[64] + 27, sig[:32], sig[32:64]]
    )
    set_eth(w3, authorizer)
    receipt = _send(w3, key, token, data)
    assert receipt["status"] == 1, receipt
    return receipt


def use_authorization(w3: Web3, token: str, sender_key: str, authorization: dict[str, str], signature: str) -> dict[str, Any]:
    """Submit a signed authorization ourselves (the payer racing the gateway's settlement)."""
    sig = bytes.fromhex(signature.removeprefix("0x"))
    data = SEL_TRANSFER_WITH_AUTHORIZATION + abi_encode(
        ["address", "address", "uint256", "uint256", "uint256", "bytes32", "uint8", "bytes32", "bytes32"],
        [authorization["from"], authorization["to"], int(authorization["value"]), int(authorization["validAfter"]),
         int(authorization["validBefore"]), bytes.fromhex(authorization["nonce"].removeprefix("0x")),
         sig[64], sig[:32], sig[32:64]],
    )
    receipt = _send(w3, sender_key, token, data)
    assert receipt["status"] == 1, receipt
    return receipt
