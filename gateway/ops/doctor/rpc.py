"""A small JSON-RPC reader for the doctor: one short-lived httpx client per run, a deadline per
call, and errors that say what went wrong (unreachable, an HTTP status, a JSON-RPC error) without
the URL's credentials. The gateway's own chain client (``settlement.chain``) is built for the paid
path; the doctor only reads, and must tell "no answer" from "a wrong answer"."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from eth_abi import decode as abi_decode
from eth_hash.auto import keccak

__all__ = ["RpcProblem", "RpcReader", "selector"]


def selector(signature: str) -> bytes:
    return keccak(signature.encode("ascii"))[:4]


class RpcProblem(Exception):
    """The RPC did not answer usably. ``reverted``: it answered, the call itself failed."""

    def __init__(self, message: str, *, reverted: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.reverted = reverted


SEL_NAME = selector("name()")
SEL_VERSION = selector("version()")
SEL_DECIMALS = selector("decimals()")
SEL_EIP712_DOMAIN = selector("eip712Domain()")


class RpcReader:
    def __init__(self, client: httpx.AsyncClient, url: str, *, timeout: float = 5.0) -> None:
        self.client = client
        self.url = url
        self.timeout = timeout

    async def call(self, method: str, params: list[Any]) -> Any:
        body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
        try:
            async with asyncio.timeout(self.timeout):
                response = await self.client.post(self.url, json=body)
        except TimeoutError:
            raise RpcProblem(f"no answer to {method} within {self.timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise RpcProblem(f"{method} failed: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise RpcProblem(f"{method} answered HTTP {response.status_code}")
        try:
            data = response.json()
        except ValueError:
            raise RpcProblem(f"{method} answered something that is not JSON") from None
        if not isinstance(data, dict):
            raise RpcProblem(f"{method} answered an unusable body")
        if "error" in data:
            error = data["error"] if isinstance(data["error"], dict) else {}
            reverted = method == "eth_call"
            raise RpcProblem(f"{method}: {str(error.get('message', 'error'))[:200]}", reverted=reverted)
        return data.get("result")

    async def chain_id(self) -> int:
        return int(str(await self.call("eth_chainId", [])), 16)

    async def code_size(self, address: str) -> int:
        code = str(await self.call("eth_getCode", [address, "latest"]) or "0x")
        return max(0, (len(code) - 2) // 2)

    async def eth_call(self, to: str, data: bytes) -> bytes:
        result = str(await self.call("eth_call", [{"to": to, "data": "0x" + data.hex()}, "latest"]) or "0x")
        out = bytes.fromhex(result[2:])
        if not out:
            raise RpcProblem("the call returned nothing", reverted=True)
        return out

    async def string(self, to: str, sel: bytes) -> str:
        try:
            return str(abi_decode(["string"], await self.eth_call(to, sel))[0])
        except RpcProblem:
            raise
        except Exception:  # noqa: BLE001 -- eth_abi's decoding errors: not a string-returning function
            raise RpcProblem("the answer is not an ABI string", reverted=True) from None

    async def uint(self, to: str, sel: bytes) -> int:
        return int.from_bytes((await self.eth_call(to, sel))[:32], "big")

    async def eip712_domain(self, to: str) -> tuple[str, str]:
        """EIP-5267's ``eip712Domain()``: the (name, version) signatures are made over."""
        try:
            decoded = abi_decode(
                ["bytes1", "string", "string", "uint256", "address", "bytes32", "uint256[]"], await self.eth_call(to, SEL_EIP712_DOMAIN)
            )
        except RpcProblem:
            raise
        except Exception:  # noqa: BLE001 -- eth_abi's decoding errors: no EIP-5267 domain here
            raise RpcProblem("eip712Domain() answer is not EIP-5267", reverted=True) from None
        return str(decoded[1]), str(decoded[2])

    async def balance(self, address: str) -> int:
        return int(str(await self.call("eth_getBalance", [address, "latest"])), 16)

    async def gas_price(self) -> int:
        return int(str(await self.call("eth_gasPrice", [])), 16)
