"""A reference paying agent: call a tool, answer the 402 within its own limits, keep the receipt.

    token = await read_token_facts(rpc_url, usdc_address)        # or pinned_token(network, asset)
    agent = PayingAgent(private_key, token, max_spend_atomic=50_000, max_per_call_atomic=10_000)
    result = await agent.call(client, "GET", "http://127.0.0.1:8402/quotes/AAPL")

The agent trusts only the chain (or a pinned list of known tokens) and its own limits, never the
gateway it pays:

- it pays in one token, on one network, whose decimals, EIP-712 name and version were read from the
  chain (``eth_chainId`` must be the network's) or pinned; an offer on another network, in another
  asset, or naming the token differently from the chain is refused before anything is signed;
- an offer over the per-call cap or the remaining budget is refused before signing; limits and
  amounts are ``int`` atomic units of that token;
- every authorization it signs is counted as spent when it is signed, receipt or not (a gateway that
  answers without ``PAYMENT-RESPONSE``, or says "failed", still holds a usable authorization);
- it signs exactly the offer's amount, payTo and asset, and never a window longer than
  ``max_valid_seconds`` whatever ``maxTimeoutSeconds`` the offer asks for.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import ValidationError

from catalog import format_amount
from settlement.chain.addresses import checksum_address
from settlement.x402.codec import decode_header_json, encode_header
from settlement.errors import PaymentDecodeError
from settlement.chain.networks import to_caip2
from gateway.devkit.payer import Payer
from settlement.x402.wire import PaymentPayload, PaymentRequired, PaymentRequirements, ResourceInfo, SettleResponse

# The longest authorization the agent signs by default: a signed, unused authorization is a cheque
# anyone holding it can cash until validBefore.
DEFAULT_MAX_VALID_SECONDS = 600
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")


class PaymentRefused(Exception):
    """The agent would not sign: the message says why. Nothing was signed."""


class SpendLimitExceeded(PaymentRefused):
    """Paying would break the per-call cap or the total budget."""


class UntrustedOffer(PaymentRefused):
    """The offer's network, asset, token name/version or payee is not what the agent trusts."""


class TokenUnverifiable(Exception):
    """Token facts could not be established from the chain or the pinned list."""


# -- token facts: from the chain, or pinned -----------------------------------------------------


@dataclass(frozen=True)
class TokenFacts:
    """What the agent knows about the token it pays in, from a source it trusts."""

    network: str  # CAIP-2, eip155:<chain id>
    address: str  # checksummed
    name: str  # EIP-712 domain name
    version: str  # EIP-712 domain version
    decimals: int
    source: str  # "chain <rpc url>" or "pinned"

    def same_token(self, network: str, asset: str) -> bool:
        return network == self.network and asset.lower() == self.address.lower()


def _pinned(network: str, address: str, name: str) -> tuple[tuple[str, str], TokenFacts]:
    return (network, address.lower()), TokenFacts(network, checksum_address(address), name, "2", 6, "pinned")


# Circle's USDC (EIP-3009) on the networks x402 names: address, EIP-712 name/version, decimals.
PINNED_TOKENS: dict[tuple[str, str], TokenFacts] = dict([
    _pinned("eip155:8453", "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913", "USD Coin"),  # Base
    _pinned("eip155:84532", "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "USDC"),  # Base Sepolia
    _pinned("eip155:1", "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48", "USD Coin"),  # Ethereum
    _pinned("eip155:137", "0x3c499c542cEF5E3811e1192ce70d8cC03d5c3359", "USD Coin"),  # Polygon
    _pinned("eip155:42161", "0xaf88d065e77c8cC2239327C5EDb3A432268e5831", "USD Coin"),  # Arbitrum One
    _pinned("eip155:421614", "0x75faf114eafb1BDbe2F0316DF893fd58CE46AA4d", "USD Coin"),  # Arbitrum Sepolia
])


def pinned_token(network: str, asset: str | None = None) -> TokenFacts | None:
    """The pinned facts of ``asset`` on ``network`` (default: that network's USDC), or None."""
    caip2 = to_caip2(network) or network
    if asset is not None:
        return PINNED_TOKENS.get((caip2, asset.lower()))
    return next((facts for (net, _), facts in PINNED_TOKENS.items() if net == caip2), None)


async def _rpc(http: httpx.AsyncClient, rpc_url: str, method: str, params: list[Any]) -> Any:
    reply = await http.post(rpc_url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    reply.raise_for_status()
    data = reply.json()
    if not isinstance(data, dict) or "error" in data or "result" not in data:
        raise TokenUnverifiable(f"{method} failed at {rpc_url}: {data.get('error') if isinstance(data, dict) else data}")
    return data["result"]


async def read_token_facts(rpc_url: str, asset: str, *, network: str | None = None, timeout: float = 10.0) -> TokenFacts:
    """Decimals and EIP-712 name/version of ``asset``, read from the chain at ``rpc_url``.

    ``network`` (CAIP-2 or a v1 name), when given, must be the chain the RPC serves. Reads
    ``eip712Domain()`` (EIP-5267) when the token has it, else ``name()`` and ``version()``.
    """
    from eth_abi import decode as abi_decode
    from eth_abi.exceptions import DecodingError

    from settlement.chain.client import SEL_DECIMALS, SEL_NAME, SEL_VERSION, selector

    if not _ADDRESS.fullmatch(asset):
        raise TokenUnverifiable(f"{asset!r} is not a token address")
    address = checksum_address(asset)
    try:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as http:
            chain_id = int(str(await _rpc(http, rpc_url, "eth_chainId", [])), 16)
            served = f"eip155:{chain_id}"
            if network is not None and (to_caip2(network) or network) != served:
                raise TokenUnverifiable(
                    f"the RPC at {rpc_url} serves chain id {chain_id} ({served}), not {network}"
                )
            code = await _rpc(http, rpc_url, "eth_getCode", [address, "latest"])
            if not isinstance(code, str) or code in ("0x", "0x0", ""):
                raise TokenUnverifiable(f"no contract at {address} on {served}")

            async def call(data: bytes) -> bytes:
                out = await _rpc(http, rpc_url, "eth_call", [{"to": address, "data": "0x" + data.hex()}, "latest"])
                return bytes.fromhex(str(out)[2:])

            name = version = None
            try:
                raw_domain = await call(selector("eip712Domain()"))
            except TokenUnverifiable:  # reverted: the token has no EIP-5267 domain getter
                raw_domain = b""
            if raw_domain:
                domain = abi_decode(
                    ["bytes1", "string", "string", "uint256", "address", "bytes32", "uint256[]"], raw_domain
                )
                if int(domain[3]) != chain_id or str(domain[4]).lower() != address.lower():
                    raise TokenUnverifiable(
                        f"the eip712Domain() of {address} names another chain or contract than {address} on {served}"
                    )
                name, version = str(domain[1]), str(domain[2])
            if name is None or version is None:
                name = str(abi_decode(["string"], await call(SEL_NAME))[0])
                version = str(abi_decode(["string"], await call(SEL_VERSION))[0])
            raw_decimals = await call(SEL_DECIMALS)
            decimals = int.from_bytes(raw_decimals[:32], "big") if len(raw_decimals) >= 32 else -1
    except httpx.HTTPError as exc:
        raise TokenUnverifiable(f"the RPC at {rpc_url} did not answer: {type(exc).__name__}") from None
    except (DecodingError, ValueError) as exc:
        raise TokenUnverifiable(f"{address} on {rpc_url} does not read as an EIP-3009 token: {exc}") from None
    if not 0 <= decimals <= 36:
        raise TokenUnverifiable(f"{address} on {served} reports {decimals} decimals")
    facts = TokenFacts(served, address, name, version, decimals, f"chain {rpc_url}")
    pinned = PINNED_TOKENS.get((served, address.lower()))
    if pinned is not None and (pinned.name, pinned.version, pinned.decimals) != (name, version, decimals):
        raise TokenUnverifiable(
            f"the chain at {rpc_url} says {address} is {name!r}/{version!r} with {decimals} decimals; "
            f"the pinned list says {pinned.name!r}/{pinned.version!r} with {pinned.decimals}"
        )
    return facts


# -- the agent ----------------------------------------------------------------------------------


@dataclass
class SignedPayment:
    """One authorization the agent signed: counted as spent from the moment it was signed."""

    method: str
    url: str
    network: str
    asset: str
    pay_to: str
    amount: int
    valid_before: int
    nonce: str
    receipt: SettleResponse | None = None


@dataclass
class CallResult:
    method: str
    url: str
    status: int
    price_atomic: int | None
    receipt: SettleResponse | None
    body: Any
    payment: SignedPayment | None = None

    @property
    def tx_hash(self) -> str | None:
        return self.receipt.transaction if self.receipt and self.receipt.success else None


def _atomic_limit(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative int of atomic units, got {value!r}")
    return value


class PayingAgent:
    """Pays in one token (``token``, trusted facts) within ``max_spend_atomic`` in total and
    ``max_per_call_atomic`` (default: the total) per call."""

    def __init__(
        self,
        private_key: str,
        token: TokenFacts,
        *,
        max_spend_atomic: int,
        max_per_call_atomic: int | None = None,
        max_valid_seconds: int = DEFAULT_MAX_VALID_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(token, TokenFacts):
            raise TypeError("token must be TokenFacts read from the chain (read_token_facts) or pinned (pinned_token)")
        self.payer = Payer(private_key)
        self.token = token
        self.max_spend_atomic = _atomic_limit(max_spend_atomic, "max_spend_atomic")
        self.max_per_call_atomic = _atomic_limit(
            max_spend_atomic if max_per_call_atomic is None else max_per_call_atomic, "max_per_call_atomic"
        )
        if isinstance(max_valid_seconds, bool) or not isinstance(max_valid_seconds, int) or max_valid_seconds < 1:
            raise ValueError("max_valid_seconds must be a positive int")
        self.max_valid_seconds = max_valid_seconds
        self._clock = clock
        self.signed: list[SignedPayment] = []

    @property
    def spent_atomic(self) -> int:
        """Everything signed so far, settled or not: a signed authorization can be used by whoever holds it."""
        return sum(payment.amount for payment in self.signed)

    @property
    def remaining_atomic(self) -> int:
        return self.max_spend_atomic - self.spent_atomic

    def _fmt(self, atomic: int) -> str:
        return format_amount(atomic, self.token.decimals)

    def _problem(
        self, option: PaymentRequirements, expect_pay_to: str | None, expect_max_amount: int | None
    ) -> tuple[str, str] | None:
        """Why ``option`` is refused, as (kind, message), or None when it can be signed."""
        token = self.token
        if option.scheme != "exact":
            return "offer", f"scheme {option.scheme!r} is not supported (only exact)"
        if option.network != token.network:
            return "offer", f"network {option.network} is not the agent's ({token.network})"
        if not _ADDRESS.fullmatch(option.asset) or option.asset.lower() != token.address.lower():
            return "offer", f"asset {option.asset} is not the agent's token ({token.address} on {token.network})"
        extra = option.extra or {}
        method = extra.get("assetTransferMethod")
        if method not in (None, "eip3009"):
            return "offer", f"asset transfer method {method!r} is not supported (only eip3009)"
        if extra.get("name") != token.name or extra.get("version") != token.version:
            return "offer", (
                f"the offer names the token {extra.get('name')!r} version {extra.get('version')!r}; "
                f"the chain says {token.name!r} version {token.version!r} ({token.source})"
            )
        if not _ADDRESS.fullmatch(option.pay_to) or int(option.pay_to, 16) == 0:
            return "offer", f"payTo {option.pay_to!r} is not an address"
        if expect_pay_to is not None and option.pay_to.lower() != expect_pay_to.lower():
            return "offer", f"the offer's payTo {option.pay_to} is not the advertised {expect_pay_to}"
        if option.max_timeout_seconds < 1:
            return "offer", f"maxTimeoutSeconds {option.max_timeout_seconds} leaves no time to pay"
        amount = int(option.amount)
        if expect_max_amount is not None and amount > expect_max_amount:
            return "offer", (
                f"the offer asks {self._fmt(amount)}, more than the advertised price {self._fmt(expect_max_amount)}"
            )
        if amount > self.remaining_atomic:
            return "limit", (
                f"paying {self._fmt(amount)} would exceed the spend limit "
                f"({self._fmt(self.spent_atomic)} of {self._fmt(self.max_spend_atomic)} spent)"
            )
        if amount > self.max_per_call_atomic:
            return "limit", f"paying {self._fmt(amount)} would exceed the per-call limit ({self._fmt(self.max_per_call_atomic)})"
        return None

    def choose(
        self, required: PaymentRequired, *, expect_pay_to: str | None = None, expect_max_amount: int | None = None
    ) -> PaymentRequirements:
        """The first option the agent may sign; ``PaymentRefused`` (nothing signed) otherwise."""
        problems: list[tuple[str, str]] = []
        for option in required.accepts:
            problem = self._problem(option, expect_pay_to, expect_max_amount)
            if problem is None:
                return option
            problems.append(problem)
        if not problems:
            raise UntrustedOffer("the offer has no payment options")
        limits = [message for kind, message in problems if kind == "limit"]
        if limits:
            raise SpendLimitExceeded(limits[0])
        raise UntrustedOffer("no acceptable payment option: " + "; ".join(message for _, message in problems))

    def sign(
        self, option: PaymentRequirements, *, resource: ResourceInfo | None = None, method: str = "", url: str = ""
    ) -> tuple[PaymentPayload, SignedPayment]:
        """Sign ``option`` (checked again here) and count it as spent at once."""
        problem = self._problem(option, None, None)
        if problem is not None:
            raise (SpendLimitExceeded if problem[0] == "limit" else UntrustedOffer)(problem[1])
        now = int(self._clock())
        valid_before = now + min(option.max_timeout_seconds, self.max_valid_seconds)
        payload = self.payer.sign(option, resource=resource, now=now, valid_before=valid_before)
        auth = payload.payload["authorization"]
        record = SignedPayment(
            method=method, url=url, network=option.network, asset=option.asset, pay_to=auth["to"],
            amount=int(auth["value"]), valid_before=int(auth["validBefore"]), nonce=auth["nonce"],
        )
        self.signed.append(record)  # counted before it leaves: receipt or not, it can be cashed
        return payload, record

    async def call(
        self,
        client: httpx.AsyncClient,
        method: str,
        url: str,
        *,
        expect_pay_to: str | None = None,
        expect_max_amount: int | None = None,
        **kwargs: Any,
    ) -> CallResult:
        """Request ``url``; answer a 402 with one payment within the limits. ``expect_pay_to`` and
        ``expect_max_amount`` (the advertised payee and price) refuse an offer that differs."""
        first = await client.request(method, url, **kwargs)
        if first.status_code != 402 or "payment-required" not in first.headers:
            return CallResult(method, url, first.status_code, None, None, _body(first))
        try:
            required = PaymentRequired.model_validate(decode_header_json(first.headers["payment-required"]))
        except (PaymentDecodeError, ValidationError, ValueError):
            raise UntrustedOffer("the 402's PAYMENT-REQUIRED header is not a valid x402 v2 offer") from None
        option = self.choose(required, expect_pay_to=expect_pay_to, expect_max_amount=expect_max_amount)
        payment, record = self.sign(option, resource=required.resource, method=method, url=url)
        headers = dict(kwargs.pop("headers", None) or {})
        headers["PAYMENT-SIGNATURE"] = encode_header(payment)
        paid = await client.request(method, url, headers=headers, **kwargs)
        receipt = None
        if "payment-response" in paid.headers:
            try:
                receipt = SettleResponse.model_validate(decode_header_json(paid.headers["payment-response"]))
            except (PaymentDecodeError, ValidationError, ValueError):
                receipt = None  # a malformed receipt is no receipt; the payment stays counted
        record.receipt = receipt
        return CallResult(method, url, paid.status_code, record.amount, receipt, _body(paid), record)


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


# -- discovery: find the tools and call one by name -------------------------------------------


@dataclass(frozen=True)
class DiscoveredTool:
    """One entry of a gateway's ``GET /tools``: what the agent needs to call and pay for it.

    These are the gateway's claims: the agent pays only within what they promise (payTo, price)
    and never takes a token fact (decimals, network, asset) from them."""

    name: str
    description: str
    method: str
    url: str  # template: https://gw/quotes/{symbol}
    parameters: dict[str, Any]
    price: str
    price_atomic: int
    asset: str
    decimals: int
    network: str
    pay_to: str

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> DiscoveredTool:
        function = entry["function"]
        return cls(
            name=function["name"], description=function.get("description", ""), method=entry["method"],
            url=entry["url"], parameters=function.get("parameters") or {"type": "object"}, price=entry["price"],
            price_atomic=int(entry["priceAtomic"]), asset=entry["asset"], decimals=int(entry["decimals"]),
            network=entry["network"], pay_to=entry["payTo"],
        )


async def discover(client: httpx.AsyncClient, gateway_url: str) -> list[DiscoveredTool]:
    response = await client.get(gateway_url.rstrip("/") + "/tools")
    response.raise_for_status()
    try:
        return [DiscoveredTool.from_entry(entry) for entry in response.json()["tools"]]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UntrustedOffer(f"{gateway_url}/tools is not a valid tool list") from None


def example_arguments(schema: dict[str, Any]) -> dict[str, Any] | None:
    """Arguments from the schema's own examples, defaults, consts or enums; None if a required one has none."""
    properties = schema.get("properties") or {}
    arguments: dict[str, Any] = {}
    for name, prop in properties.items():
        if not isinstance(prop, dict):
            continue
        for key in ("examples", "default", "const", "enum"):
            if key in prop:
                value = prop[key]
                arguments[name] = value[0] if key in ("examples", "enum") and isinstance(value, list) and value else value
                break
    if any(name not in arguments for name in schema.get("required") or []):
        return None
    return arguments


async def call_tool(
    agent: PayingAgent, client: httpx.AsyncClient, tool: DiscoveredTool, arguments: dict[str, Any]
) -> CallResult:
    """Call a discovered tool with ``arguments``, paying its 402 within the agent's limits, and
    only to the payee and at most the price ``/tools`` advertised."""
    from gateway.surfaces.discovery import tool_request

    request = tool_request(tool.method, tool.url, arguments)
    kwargs: dict[str, Any] = {}
    if request.body:
        kwargs = {"content": request.body, "headers": {"content-type": "application/json"}}
    return await agent.call(
        client, request.method, request.target, expect_pay_to=tool.pay_to, expect_max_amount=tool.price_atomic, **kwargs
    )


async def chain_network(rpc_url: str, *, timeout: float = 10.0) -> str:
    """The CAIP-2 network the RPC at ``rpc_url`` serves (its ``eth_chainId``)."""
    try:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as http:
            return f"eip155:{int(str(await _rpc(http, rpc_url, 'eth_chainId', [])), 16)}"
    except (httpx.HTTPError, ValueError) as exc:
        raise TokenUnverifiable(f"the RPC at {rpc_url} did not answer eth_chainId: {type(exc).__name__}") from None
