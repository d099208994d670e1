"""Chain access for the exact-EVM scheme: the few reads and the one write settlement needs.

One pooled aiohttp session per chain client speaks JSON-RPC; the settlement account's nonce is tracked
locally (and resynced after a nonce error), gas and fees are fixed or cached, so a settlement is
sign + ``eth_sendRawTransaction`` + receipt, never web3's estimate/fee/nonce round trips.
web3 and RPC errors are translated here into ``ChainUnavailable``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp
from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_account import Account
from eth_hash.auto import keccak
from web3.exceptions import TransactionNotFound, Web3Exception

from settlement.eip712 import TransferAuthorization, split_signature
from settlement.errors import BroadcastUncertain, ChainUnavailable
from settlement.transaction import TransactionSigner


def selector(signature: str) -> bytes:
    return keccak(signature.encode("ascii"))[:4]


SEL_AUTHORIZATION_STATE = selector("authorizationState(address,bytes32)")
SEL_BALANCE_OF = selector("balanceOf(address)")
SEL_NAME = selector("name()")
SEL_VERSION = selector("version()")
SEL_DECIMALS = selector("decimals()")
SEL_TRANSFER = selector("transfer(address,uint256)")
SEL_TRANSFER_WITH_AUTHORIZATION = selector(
    "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
)
TOPIC_TRANSFER = keccak(b"Transfer(address,address,uint256)")
TOPIC_AUTHORIZATION_USED = keccak(b"AuthorizationUsed(address,bytes32)")

TRANSFER_GAS_LIMIT = 150_000
FEE_CACHE_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class LogEntry:
    address: str
    topics: tuple[bytes, ...]
    data: bytes


@dataclass(frozen=True, slots=True)
class Receipt:
    tx_hash: str
    status: int
    block_number: int
    logs: tuple[LogEntry, ...] = field(default=())

    def has_transfer(self, token: str, from_: str, to: str, value: int) -> bool:
        want = (TOPIC_TRANSFER, _topic_address(from_), _topic_address(to))
        for log in self.logs:
            if log.address.lower() == token.lower() and log.topics[:3] == want:
                if int.from_bytes(log.data[:32], "big") == value:
                    return True
        return False

    def has_authorization_used(self, token: str, authorizer: str, nonce: bytes) -> bool:
        """The token's ``AuthorizationUsed(authorizer, nonce)`` is in this receipt: this transaction
        used that very authorization (a batch receipt holds many Transfer logs; this one is unique)."""
        want = (TOPIC_AUTHORIZATION_USED, _topic_address(authorizer), nonce)
        return any(log.address.lower() == token.lower() and log.topics[:3] == want for log in self.logs)


def _topic_address(address: str) -> bytes:
    return bytes.fromhex(address[2:].lower()).rjust(32, b"\x00")


# Called with the transaction hash after signing and before broadcasting: the write-ahead hook.
BeforeSend = Callable[[str], Awaitable[None]]


class Chain(Protocol):
    """What the local facilitator needs from a chain."""

    chain_id: int

    async def authorization_state(self, token: str, authorizer: str, nonce: bytes) -> bool: ...

    async def balance_of(self, token: str, owner: str) -> int: ...

    async def send_transfer_with_authorization(
        self, token: str, auth: TransferAuthorization, signature: bytes, before_send: BeforeSend | None = None
    ) -> str: ...

    async def find_authorization_used(self, token: str, authorizer: str, nonce: bytes) -> Receipt | None: ...

    async def wait_for_receipt(self, tx_hash: str, timeout: float) -> Receipt | None: ...

    async def block_number(self) -> int: ...


class Web3Chain:
    """Chain access over JSON-RPC through web3's async provider."""

    def __init__(self, rpc_url: str, chain_id: int, settlement_key: str | None, *, request_timeout: float = 10.0):
        self.rpc_url = rpc_url
        self.chain_id = chain_id
        self._request_timeout = request_timeout
        # JSON-RPC over one pooled aiohttp session (created on first use, in the loop that uses it):
        # web3's provider layer costs ≈3× the round trip itself on this path (bench/profile_gateway.py).
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._request_id = 0
        self._account = Account.from_key(settlement_key) if settlement_key else None
        self._signer = TransactionSigner(settlement_key) if settlement_key else None
        self._nonce: int | None = None
        self._nonce_lock = asyncio.Lock()
        self._fees: tuple[float, int, int] | None = None  # (fetched_at, max_fee, priority_fee)

    @property
    def settlement_address(self) -> str | None:
        return self._account.address if self._account else None

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed and self._session_loop is asyncio.get_running_loop():
            await session.close()

    def _client(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            connector = aiohttp.TCPConnector(limit=64, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self._request_timeout), trust_env=False
            )
            self._session_loop = loop
        return self._session

    async def _rpc(self, method: str, params: list[Any]) -> Any:
        self._request_id += 1
        body = {"jsonrpc": "2.0", "id": self._request_id, "method": method, "params": params}
        try:
            async with self._client().post(self.rpc_url, json=body) as reply:
                response = await reply.json(content_type=None)
        except (OSError, asyncio.TimeoutError, Web3Exception) as exc:
            raise ChainUnavailable(f"chain RPC {method} failed: {type(exc).__name__}") from exc
        except Exception as exc:  # aiohttp client errors, a body that is not JSON: infrastructure, not payment
            raise ChainUnavailable(f"chain RPC {method} failed: {type(exc).__name__}") from exc
        if not isinstance(response, dict):
            raise ChainUnavailable(f"chain RPC {method} failed: not a JSON-RPC answer")
        if "error" in response:
            error = response["error"]
            message = error.get("message", "") if isinstance(error, dict) else str(error)
            raise RpcError(method, message)
        return response.get("result")

    async def _call(self, to: str, data: bytes) -> bytes:
        result = await self._rpc("eth_call", [{"to": to, "data": "0x" + data.hex()}, "latest"])
        return bytes.fromhex(str(result)[2:])

    async def authorization_state(self, token: str, authorizer: str, nonce: bytes) -> bool:
        out = await self._call(token, SEL_AUTHORIZATION_STATE + abi_encode(["address", "bytes32"], [authorizer, nonce]))
        return bool(int.from_bytes(out[:32], "big"))

    async def balance_of(self, token: str, owner: str) -> int:
        out = await self._call(token, SEL_BALANCE_OF + abi_encode(["address"], [owner]))
        return int.from_bytes(out[:32], "big")

    async def token_metadata(self, token: str) -> tuple[str, str, int]:
        name = abi_decode(["string"], await self._call(token, SEL_NAME))[0]
        version = abi_decode(["string"], await self._call(token, SEL_VERSION))[0]
        decimals = int.from_bytes((await self._call(token, SEL_DECIMALS))[:32], "big")
        return str(name), str(version), decimals

    async def remote_chain_id(self) -> int:
        return int(await self._rpc("eth_chainId", []), 16)

    async def block_number(self) -> int:
        return int(await self._rpc("eth_blockNumber", []), 16)

    async def _fees_now(self) -> tuple[int, int]:
        now = time.monotonic()
        if self._fees is None or now - self._fees[0] > FEE_CACHE_SECONDS:
            block = await self._rpc("eth_getBlockByNumber", ["latest", False])
            base_fee = int(block.get("baseFeePerGas", "0x0"), 16)
            priority = 1_000_000  # 0.001 gwei tip; the base fee dominates on L2s and anvil
            self._fees = (now, 2 * base_fee + priority, priority)
        return self._fees[1], self._fees[2]

    async def send_transfer_with_authorization(
        self, token: str, auth: TransferAuthorization, signature: bytes, before_send: BeforeSend | None = None
    ) -> str:
        if self._account is None:
            raise ChainUnavailable("no settlement key configured for this chain", code="settlement_key_missing")
        v, r, s = split_signature(signature)
        calldata = SEL_TRANSFER_WITH_AUTHORIZATION + abi_encode(
            ["address", "address", "uint256", "uint256", "uint256", "bytes32", "uint8", "bytes32", "bytes32"],
            [auth.from_, auth.to, auth.value, auth.valid_after, auth.valid_before, auth.nonce, v, r, s],
        )
        return await self.send_call(token, calldata, before_send)

    async def send_call(
        self, to: str, calldata: bytes, before_send: BeforeSend | None = None, *, gas: int = TRANSFER_GAS_LIMIT
    ) -> str:
        """Sign and broadcast a call from the settlement account; the hash is reported first."""
        if self._signer is None or self._account is None:
            raise ChainUnavailable("no settlement key configured for this chain", code="settlement_key_missing")
        max_fee, priority = await self._fees_now()
        async with self._nonce_lock:
            for attempt in range(2):
                if self._nonce is None:
                    count = await self._rpc("eth_getTransactionCount", [self._account.address, "pending"])
                    self._nonce = int(count, 16)
                signed = self._signer.sign(
                    chain_id=self.chain_id,
                    nonce=self._nonce,
                    to=to,
                    data=calldata,
                    gas=gas,
                    max_fee_per_gas=max_fee,
                    max_priority_fee_per_gas=priority,
                )
                tx_hash_local = "0x" + signed.hash.hex()
                if before_send is not None:
                    await before_send(tx_hash_local)
                try:
                    tx_hash = await self._rpc("eth_sendRawTransaction", ["0x" + signed.raw.hex()])
                except RpcError as exc:
                    if "nonce" in exc.rpc_message.lower() and attempt == 0:
                        self._nonce = None  # someone else used the account, or a restart: resync once
                        continue
                    raise
                except ChainUnavailable:
                    # Sent, answer lost: the node may have it. Keep the nonce consumed and report
                    # the hash so the outcome can be resolved against the chain.
                    self._nonce += 1
                    raise BroadcastUncertain(tx_hash_local) from None
                self._nonce += 1
                return str(tx_hash)
        raise ChainUnavailable("could not allocate a settlement nonce", code="settlement_nonce_error")

    async def send_transfer(self, token: str, to: str, amount: int, before_send: BeforeSend | None = None) -> str:
        """A plain ERC-20 transfer from this chain client's account (refunds)."""
        return await self.send_call(token, SEL_TRANSFER + abi_encode(["address", "uint256"], [to, amount]), before_send)

    async def find_authorization_used(self, token: str, authorizer: str, nonce: bytes) -> Receipt | None:
        """The receipt of the transaction that used (authorizer, nonce), from the token's logs."""
        logs = await self._rpc(
            "eth_getLogs",
            [{
                "address": token,
                "fromBlock": "0x0",
                "toBlock": "latest",
                "topics": ["0x" + TOPIC_AUTHORIZATION_USED.hex(), "0x" + _topic_address(authorizer).hex(), "0x" + nonce.hex()],
            }],
        )
        if not logs:
            return None
        return await self.get_receipt(logs[0]["transactionHash"])

    async def get_receipt(self, tx_hash: str) -> Receipt | None:
        raw = await self._rpc("eth_getTransactionReceipt", [tx_hash])
        if raw is None:
            return None
        logs = tuple(
            LogEntry(
                address=log["address"],
                topics=tuple(bytes.fromhex(t[2:]) for t in log["topics"]),
                data=bytes.fromhex(log["data"][2:]),
            )
            for log in raw.get("logs", [])
        )
        return Receipt(
            tx_hash=tx_hash, status=int(raw["status"], 16), block_number=int(raw["blockNumber"], 16), logs=logs
        )

    async def get_logs(
        self, address: str, topics: list[str | list[str] | None], from_block: int, to_block: int
    ) -> list[dict[str, Any]]:
        """Raw ``eth_getLogs`` entries of one contract over an inclusive block range (reconcile)."""
        logs = await self._rpc(
            "eth_getLogs",
            [{"address": address, "fromBlock": hex(from_block), "toBlock": hex(to_block), "topics": topics}],
        )
        return list(logs or [])

    async def wait_for_receipt(self, tx_hash: str, timeout: float) -> Receipt | None:
        """The receipt, or None when the transaction is still not mined after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            try:
                receipt = await self.get_receipt(tx_hash)
            except TransactionNotFound:
                receipt = None
            if receipt is not None:
                return receipt
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)


class RpcError(ChainUnavailable):
    """The node answered with a JSON-RPC error (a revert, a nonce error, ...)."""

    code = "chain_rpc_error"

    def __init__(self, method: str, rpc_message: str) -> None:
        super().__init__(f"chain RPC {method} returned an error")
        self.rpc_message = rpc_message
