"""Gateway settings: one typed object, env prefix ``X402GW_``, built once in ``main()``.

The fields are flat because they are the environment's vocabulary (``X402GW_RATE_LIMIT_PER_CLIENT``
and friends are a stable interface) and the constructor's (``Settings(database_url=...)``). Code
reads them by concern, through typed read-only views built from those fields:

    settings.server         host, port, public_url, challenge_body, log_level
    settings.http           request and response size limits
    settings.storage        database_url, redis_url, redis_prefix
    settings.chain          deployment_file, rpc_urls, settlement_key, refund_key, receipt timeout, batching
    settings.facilitator    per-network facilitators, remote URL and timeout, the served facilitator
    settings.safety         gateway-wide budgets, rate limits, price ceiling, policy file
    settings.admin          admin token, readiness timeout

Several RPC URLs or facilitators per network (a JSON list instead of one string) are read with
``rpc_urls_for`` / ``facilitators_for``; the credentials sent to each remote facilitator with
``facilitator_auth_for`` (static headers, or a CDP JWT per request). Secrets may come from files
(``X402GW_SETTLEMENT_KEY_FILE``, ``X402GW_REFUND_KEY_FILE``, ``X402GW_FACILITATOR_AUTH_FILE``,
``X402GW_CDP_API_KEY_SECRET_FILE``); they are ``SecretStr`` and never in a repr or an error.

A view is rebuilt on each access (a few attribute copies), so it never goes stale when a test sets a
flat field; read it once where it matters.

Longer than the ~400-line rule on purpose: one flat field per environment variable, each with the
comment that documents it, in one place a reader can search.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from catalog.limits import Budget, RateLimit, parse_budget, parse_rate_limit
from catalog.registry import resolve_network
from catalog.source import read_catalog_text
from gateway.errors import GatewayConfigError
from settlement.chain.rpc import redact_url
from settlement.schemes.facilitator_auth import CdpJwtAuth, FacilitatorAuth, FacilitatorAuthError, StaticHeaders

__all__ = [
    "DEFAULT_CATALOG",
    "AdminSettings",
    "BatchSettlement",
    "ChainSettings",
    "FacilitatorSettings",
    "HttpLimits",
    "SafetySettings",
    "ServerSettings",
    "Settings",
    "StorageSettings",
]


def _budget(value: Any) -> Any:
    return parse_budget(value) if isinstance(value, str) and value.strip() else (value or None)


def _rate_limit(value: Any) -> Any:
    return parse_rate_limit(value) if isinstance(value, str) and value.strip() else (value or None)


_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_CAIP2 = re.compile(r"[-a-z0-9]{3,8}:[-_a-zA-Z0-9]{1,32}")
ANY = "*"  # an allow-list setting's explicit "anything" (the served facilitator's payTo and assets)


def _allow_list(value: Any, setting: str, entry: Callable[[str], str | None], shape: str) -> Any:
    """A comma-separated (or list) allow-list setting: each entry normalised by ``entry`` (None: not
    one), or ``*`` alone; a bad value is a GatewayConfigError with a stable code, never a guess."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list):
        return value
    code = f"invalid_{setting}"
    if ANY in value:
        if value != [ANY]:
            raise GatewayConfigError(f"{setting}: \"*\" (any) stands alone, not beside other entries", code=code)
        return value
    normalised = []
    for item in value:
        good = entry(item) if isinstance(item, str) else None
        if good is None:
            raise GatewayConfigError(f"{setting}: entries are {shape} or \"*\" alone, got {item!r}", code=code)
        normalised.append(good)
    return normalised


def _address_entry(item: str) -> str | None:
    return item if _ADDRESS.fullmatch(item) else None


def _asset_entry(item: str) -> str | None:
    """``NETWORK/ASSET``: a CAIP-2 id or a network name the registry knows, and a token address."""
    network, _, asset = item.strip().rpartition("/")
    network = resolve_network(network) or network
    return f"{network}/{asset}" if _CAIP2.fullmatch(network) and _ADDRESS.fullmatch(asset) else None

DEFAULT_CATALOG = Path(__file__).resolve().parent.parent / "catalog" / "examples" / "demo.yaml"
# Facilitators on this host get a CDP JWT when CDP_API_KEY_ID is set and X402GW_FACILITATOR_AUTH
# names no other credentials for them.
CDP_HOST = "api.cdp.coinbase.com"


def _usd_rates(value: Any) -> Any:
    """{network: dollars per native coin}: decimal strings (or ints), never a JSON float (inexact)."""
    if not isinstance(value, dict):
        return value
    rates: dict[Any, Decimal] = {}
    for network, rate in value.items():
        try:
            exact = Decimal(rate) if isinstance(rate, (str, int)) and not isinstance(rate, bool) else None
        except ArithmeticError:  # decimal.InvalidOperation: not a number
            exact = None
        if exact is None or not exact.is_finite() or exact < 0:
            raise GatewayConfigError(f"{network}: write the native coin's dollar rate as a decimal string, e.g. \"3150.25\"")
        rates[network] = exact
    return rates


def _url_lists(value: Any) -> Any:
    """{network: URL, or several}: a JSON list of URLs, or one string with URLs separated by spaces
    (a URL holds no raw space), kept as that one string so every reader of the map still gets
    strings; ``_as_list`` splits it."""
    if not isinstance(value, dict):
        return value
    joined: dict[Any, Any] = {}
    for network, urls in value.items():
        listed = urls.split() if isinstance(urls, str) else urls
        if not isinstance(listed, list) or not listed or not all(isinstance(u, str) and u.split() == [u] for u in listed):
            raise GatewayConfigError(f"{network}: give a URL, or a non-empty list of URLs")
        joined[network] = " ".join(listed)
    return joined


def _as_list(value: str) -> list[str]:
    return value.split()


def _read_secret_file(path: Path, what: str) -> str:
    try:  # a regular file only (a FIFO would block every command for ever), small, UTF-8
        text = read_catalog_text(str(path)).strip()
    except OSError as exc:
        raise GatewayConfigError(f"{what}: cannot read {path}: {exc.strerror or type(exc).__name__}",
                                 code="secret_file_unreadable") from None
    except UnicodeDecodeError:
        raise GatewayConfigError(f"{what}: {path} is not UTF-8 text", code="secret_file_unreadable") from None
    if not text:
        raise GatewayConfigError(f"{what}: {path} is empty", code="secret_file_empty")
    return text


class BatchSettlement(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_wait_ms: float = Field(default=20.0, gt=0, le=10_000)
    # At most 150: a batch asks 60k + 110k gas per item (settlement.schemes.batch), and 150 items
    # (16.56M) stay under EIP-7825's per-transaction gas cap of 2**24 (16,777,216).
    max_payments: int = Field(default=50, ge=1, le=150)
    # Group commit (settlement.schemes.batch): send at once when no batch is in flight. JSON true/false only.
    flush_when_idle: bool = Field(default=False, strict=True)
    contract: str | None = Field(default=None, pattern=r"^0x[0-9a-fA-F]{40}$")
    # Several BatchSettlers, one per settlement account (``serve --workers``): each process settles
    # through the one whose ``settler`` is its own account, checked on chain at start-up.
    contracts: list[Annotated[str, Field(pattern=r"^0x[0-9a-fA-F]{40}$")]] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_way_to_name_contracts(self) -> BatchSettlement:
        if self.contract is not None and self.contracts is not None:
            raise ValueError('give "contract" (one BatchSettler) or "contracts" (one per worker), not both')
        if self.contracts is not None and len({c.lower() for c in self.contracts}) != len(self.contracts):
            raise ValueError('"contracts" lists a BatchSettler twice')
        return self

    @property
    def candidates(self) -> list[str]:
        """The BatchSettlers this network may settle through (none: the dev chain deployment's)."""
        return list(self.contracts) if self.contracts is not None else [self.contract] if self.contract else []


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str
    port: int
    public_url: str | None
    challenge_body: Literal["v2", "v1"]
    log_level: str


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_body_bytes: int
    max_header_bytes: int
    max_upstream_response_bytes: int


@dataclass(frozen=True, slots=True)
class StorageSettings:
    database_url: str
    redis_url: str | None
    redis_prefix: str


@dataclass(frozen=True, slots=True)
class ChainSettings:
    deployment_file: Path
    rpc_urls: dict[str, str]  # several URLs of a network separated by spaces: Settings.rpc_urls_for
    settlement_key: SecretStr | None
    refund_key: SecretStr | None
    receipt_timeout_seconds: float
    batch_settlement: dict[str, BatchSettlement]


@dataclass(frozen=True, slots=True)
class FacilitatorSettings:
    by_network: dict[str, str]  # X402GW_FACILITATORS (several: separated by spaces)
    url: str | None  # X402_FACILITATOR_URL
    settle_timeout_seconds: float
    serve: bool  # X402GW_SERVE_FACILITATOR
    rate_limit: RateLimit | None  # X402GW_FACILITATOR_RATE_LIMIT
    pay_to: list[str]  # X402GW_FACILITATOR_PAY_TO
    assets: list[str]  # X402GW_FACILITATOR_ASSETS, NETWORK/ASSET entries

    def allowed(
        self, own_pay_to: Iterable[str], own_assets: Iterable[tuple[str, str]]
    ) -> tuple[list[str] | None, list[tuple[str, str]] | None]:
        """The payTo addresses and (network, asset) pairs the served facilitator is for: the ones
        configured, or (none configured) this gateway's own, from its catalog; None: any ("*")."""
        pay_to = None if self.pay_to == [ANY] else self.pay_to or sorted(own_pay_to)
        if self.assets == [ANY]:
            return pay_to, None
        assets = [(e.rpartition("/")[0], e.rpartition("/")[2]) for e in self.assets] or sorted(own_assets)
        return pay_to, assets


@dataclass(frozen=True, slots=True)
class SafetySettings:
    budget_per_payer: Budget | None
    budget_per_payer_per_tool: Budget | None
    budget_per_owner: Budget | None
    rate_limit_per_payer: RateLimit | None
    rate_limit_per_tool: RateLimit | None
    rate_limit_per_client: RateLimit | None
    max_price: Decimal | None
    policy_file: Path | None


@dataclass(frozen=True, slots=True)
class AdminSettings:
    token: SecretStr | None  # X402GW_ADMIN_TOKEN
    readiness_timeout_seconds: float


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="X402GW_", extra="ignore", populate_by_name=True)

    # Catalog files (comma-separated in the environment).
    catalog: Annotated[list[Path], NoDecode] = Field(default_factory=lambda: [DEFAULT_CATALOG])
    host: str = "127.0.0.1"
    port: int = Field(default=8402, ge=0, le=65535)
    # Base URL agents reach the gateway at, used in offers (resource.url); default: from the request.
    public_url: str | None = None

    database_url: str = "sqlite:///var/x402gw.sqlite3"
    # Written by `x402gw devchain`: RPC URL, token, settlement key for the local chain.
    deployment_file: Path = Path("var/devchain.json")
    # Per-network RPC endpoints, e.g. {"eip155:8453": "https://..."} (JSON in the environment); a
    # list of URLs fails over in order (settlement.chain.rpc). Read with rpc_urls_for().
    rpc_urls: Annotated[dict[str, str], BeforeValidator(_url_lists)] = Field(default_factory=dict)
    # Key of the account that submits settlement transactions (pays gas). Never logged. Or a file
    # holding it (X402GW_SETTLEMENT_KEY_FILE, e.g. a mounted secret), never both.
    settlement_key: SecretStr | None = None
    settlement_key_file: Path | None = None
    receipt_timeout_seconds: float = Field(default=30.0, gt=0)
    # How often `pending` payments (broadcast, not final when their request answered) are resolved
    # against the chain in the background, so the ledger and webhooks follow the chain without a
    # resend, a restart or a reconcile; 0: never (settlement.ledger.resolve.keep_resolving).
    resolve_pending_seconds: float = Field(default=30.0, ge=0)
    # Key that signs payers' receipts (EIP-712; its address is published in /.well-known/x402). Never
    # logged. Default on the local chain only: an anvil dev key (gateway.surfaces.receipts).
    receipt_key: SecretStr | None = None
    receipt_key_file: Path | None = None
    # Dollars per native coin per network, for gas in dollars in ledger summaries and /admin, e.g.
    # {"eip155:8453": "3150.25"} (JSON in X402GW_NATIVE_USD_RATE; strings, never floats).
    native_usd_rate: Annotated[dict[str, Decimal], BeforeValidator(_usd_rates)] = Field(default_factory=dict)
    # Webhook endpoints per owner (JSON; gateway.ops.webhooks.config): {"owner": [{"name", "url",
    # "events", "secret_env" | "secret_file"}]}. Deliveries: a lease per row, then a retry after
    # 1 s, 2 s, 4 s ... (at most an hour) up to webhook_max_attempts; the outbox is polled this often.
    webhooks: dict[str, list[dict[str, Any]]] = Field(default_factory=dict)
    webhook_lease_seconds: float = Field(default=30.0, gt=0)
    webhook_max_attempts: int = Field(default=12, ge=1)
    webhook_poll_seconds: float = Field(default=1.0, gt=0)

    # Body of an unpaid 402: "v2" (the same JSON as PAYMENT-REQUIRED) or "v1" for fleets of old v1
    # clients that read only the body. The PAYMENT-REQUIRED header is v2 either way.
    challenge_body: Literal["v2", "v1"] = "v2"
    # The x402 payment-identifier extension (an idempotency id the client picks; it is on no chain):
    # "optional" (default) advertises it; "required" declares it required and refuses a payment
    # without one (402 payment_identifier_missing) before anything is spent. A settled payment's signed
    # payload is public (the transaction's calldata); one sent with an id replays its stored answer
    # only to that id, so "required" keeps every answer to its payer. Clients must send an id.
    payment_identifier: Literal["optional", "required"] = "optional"

    # Shared state (in-flight locks, idempotency, rate limits, budgets): memory for one process,
    # Redis for several replicas. Keys are prefixed so deployments can share a server.
    redis_url: str | None = None
    redis_prefix: str = "x402gw:"
    # Facilitators: "local" (in-process, this gateway's chain access) or a URL, per network; the
    # standard X402_FACILITATOR_URL (no prefix) selects a remote facilitator for every network.
    # A list of URLs is tried in order (settlement.schemes.failover); "local" stands alone.
    facilitators: Annotated[dict[str, str], BeforeValidator(_url_lists)] = Field(default_factory=dict)
    facilitator_url: str | None = Field(default=None, validation_alias="X402_FACILITATOR_URL")
    # Credentials per remote facilitator URL (JSON, or the same JSON in a file): {"https://f.example":
    # {"Authorization": "Bearer ..."}} for static headers, or "cdp" for a CDP JWT per request from
    # CDP_API_KEY_ID and CDP_API_KEY_SECRET (or X402GW_CDP_API_KEY_SECRET_FILE). Keyed by URL, not
    # network: one facilitator's credentials are never sent to another.
    facilitator_auth: SecretStr | None = None
    facilitator_auth_file: Path | None = None
    cdp_api_key_id: str | None = Field(default=None, validation_alias=AliasChoices("CDP_API_KEY_ID", "cdp_api_key_id"))
    cdp_api_key_secret: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("CDP_API_KEY_SECRET", "cdp_api_key_secret")
    )
    cdp_api_key_secret_file: Path | None = None
    # Longest wait for a remote facilitator's /settle answer (the whole call); no answer by then is
    # an unknown outcome (503, reconciled). The in-flight lock of a payment outlives it.
    facilitator_settle_timeout_seconds: float = Field(default=60.0, gt=0, le=3600)
    # Serve /facilitator/{supported,verify,settle} backed by the local facilitator.
    # Off by default: a public facilitator lets anyone spend this gateway's gas on their transfers.
    serve_facilitator: bool = False
    # Requests to /facilitator/verify and /facilitator/settle per client address (peer address),
    # REQUESTS/WINDOW[:BURST] as below; 429 rate_limited above it. Empty turns the limit off.
    facilitator_rate_limit: Annotated[RateLimit | None, BeforeValidator(_rate_limit)] = Field(
        default_factory=lambda: parse_rate_limit("60/1m")
    )
    # payTo addresses the served facilitator verifies and settles for (comma-separated in the
    # environment). Empty (the default): the catalog's own payees (every offer's pay_to). "*" alone:
    # any payTo, the gateway paying the gas of anyone's transfers: only for a facilitator meant for
    # others. Any other payTo is refused (pay_to_not_allowed) before any RPC.
    facilitator_pay_to: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Assets the served facilitator verifies and settles, as NETWORK/ASSET entries (comma-separated;
    # NETWORK a CAIP-2 id or a known name), e.g. "eip155:8453/0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913".
    # Empty (the default): the catalog's own (every offer's network and asset). "*" alone: any
    # EIP-3009 token, a griefer's own included. Any other is refused (asset_not_allowed) before any RPC.
    facilitator_assets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # ERC-6492 (counterfactual smart-wallet) payments: the wallet factories whose deployment the
    # gateway simulates and, at settlement, pays the gas for (comma-separated addresses, any
    # network). Empty: every 6492 signature is refused (eip6492_factory_not_allowed). On the
    # local chain, the dev chain deployment file's factory is allowed as well.
    eip6492_allowed_factories: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Key of an account holding the payee's funds, used to pay refunds of `upfront` tools back on
    # chain. Without it refunds are recorded as owed. Never logged.
    refund_key: SecretStr | None = None
    refund_key_file: Path | None = None
    # Batched settlement, opt-in per network: payments collected for up to max_wait_ms or
    # max_payments and settled in one BatchSettler transaction, e.g.
    # {"eip155:31337": {"max_wait_ms": 20, "max_payments": 50}}; "contract" names the BatchSettler
    # (default on the local chain: the one in the dev chain deployment file).
    batch_settlement: dict[str, BatchSettlement] = Field(default_factory=dict)
    # The x402 batch-settlement scheme (settlement.schemes.channels): accepted vouchers are claimed
    # in one transaction when this many wait on a network, or when the oldest has waited this long
    # (whichever comes first); a channel's suggested deposit (the 402's extra.minDeposit) is the
    # price times deposit_calls. At most 600 s: a payer may withdraw its channel 900 s (the escrow's
    # least withdrawDelay) after asking, and what it owes must be claimed before.
    channel_claim_every_calls: int = Field(default=100, gt=0)
    channel_claim_every_seconds: float = Field(default=300.0, gt=0, le=600)
    channel_deposit_calls: int = Field(default=100, gt=0)
    # The least deposit taken, in calls of the price: the gateway pays each deposit's gas (and its
    # claim's), so a channel opened for one call's price would cost the seller more than it earns.
    # A deposit below it is refused (invalid_batch_settlement_evm_deposit_below_min_deposit).
    channel_min_deposit_calls: int = Field(default=10, gt=0)

    # Operations: the dashboard at /admin needs this token (Bearer, or ?token= once in a browser);
    # without one /admin answers 404. Each /readyz check is bounded by the timeout.
    admin_token: SecretStr | None = None
    readiness_timeout_seconds: float = Field(default=2.0, gt=0)

    max_body_bytes: int = Field(default=1_048_576, gt=0)
    max_upstream_response_bytes: int = Field(default=10 * 1_048_576, gt=0)
    # Request headers, all names and values together (431 above it).
    max_header_bytes: int = Field(default=32_768, gt=0)

    # Safety limits, gateway-wide; the catalog can add its own (see catalog/limits.py).
    # Budgets are AMOUNT/WINDOW in token units, e.g. "5.00/1d" (windows: 30s, 5m, 1h, 1d, 1w).
    budget_per_payer: Annotated[Budget | None, BeforeValidator(_budget)] = None
    budget_per_payer_per_tool: Annotated[Budget | None, BeforeValidator(_budget)] = None
    budget_per_owner: Annotated[Budget | None, BeforeValidator(_budget)] = None
    # Rate limits are REQUESTS/WINDOW[:BURST], e.g. "10/1s" or "60/1m:120". per_client counts
    # unpaid requests per client address (the peer address: put the limit at the proxy when there is one).
    rate_limit_per_payer: Annotated[RateLimit | None, BeforeValidator(_rate_limit)] = None
    rate_limit_per_tool: Annotated[RateLimit | None, BeforeValidator(_rate_limit)] = None
    rate_limit_per_client: Annotated[RateLimit | None, BeforeValidator(_rate_limit)] = None
    # No tool may cost more than this (decimal token amount); checked at start-up and per request.
    max_price: Decimal | None = Field(default=None, gt=0)
    # Payer allow/deny lists and kill switches, re-read when the file changes (YAML or JSON);
    # X402GW_ADMIN_TOKEN also enables POST /admin/kill-switch and /admin/payers (gateway/policy.py).
    policy_file: Path | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    # A key pasted with a space or newline around it is the same key: stripped, as a key file's is,
    # so the dev-key refusal (gateway.wiring) sees it as it is.
    @field_validator("settlement_key", "refund_key", "receipt_key", mode="before")
    @classmethod
    def _strip_keys(cls, value: Any) -> Any:
        if isinstance(value, SecretStr):
            return SecretStr(value.get_secret_value().strip())
        return value.strip() if isinstance(value, str) else value

    # Raise GatewayConfigError (codes invalid_facilitator_pay_to, invalid_facilitator_assets).
    @field_validator("facilitator_pay_to", mode="before")
    @classmethod
    def _split_pay_to(cls, value: Any) -> Any:
        return _allow_list(value, "facilitator_pay_to", _address_entry, "0x-prefixed 20-byte addresses")

    @field_validator("facilitator_assets", mode="before")
    @classmethod
    def _split_assets(cls, value: Any) -> Any:
        return _allow_list(value, "facilitator_assets", _asset_entry, "NETWORK/0x-ASSET-ADDRESS")

    @field_validator("eip6492_allowed_factories", mode="before")
    @classmethod
    def _split_factories(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            for address in value:
                if not isinstance(address, str) or not _ADDRESS.fullmatch(address):
                    raise ValueError(
                        f"eip6492_allowed_factories entries must be 0x-prefixed 20-byte addresses, got {address!r}"
                    )
        return value

    @field_validator("facilitators")
    @classmethod
    def _local_stands_alone(cls, value: dict[str, str]) -> dict[str, str]:
        for network, where in value.items():
            if len(where.split()) > 1 and "local" in where.split():
                raise GatewayConfigError(f"{network}: \"local\" cannot be in a list of facilitators (it writes ahead, remote ones cannot)")
        return value

    # These validators raise GatewayConfigError, not ValueError: pydantic passes it through as it
    # is, where a ValueError would become a ValidationError quoting the input (secrets included).
    @model_validator(mode="after")
    def _deposit_floor_below_suggestion(self) -> Settings:
        if self.channel_min_deposit_calls > self.channel_deposit_calls:
            raise GatewayConfigError(
                f"X402GW_CHANNEL_MIN_DEPOSIT_CALLS ({self.channel_min_deposit_calls}) is above X402GW_CHANNEL_DEPOSIT_CALLS "
                f"({self.channel_deposit_calls}): clients deposit what the 402 suggests, which would be refused")
        return self

    @model_validator(mode="after")
    def _keys_from_files(self) -> Settings:
        for name in ("settlement_key", "refund_key", "facilitator_auth", "cdp_api_key_secret", "receipt_key"):
            path: Path | None = getattr(self, f"{name}_file")
            if path is None:
                continue
            env = f"X402GW_{name.upper()}_FILE"
            if getattr(self, name) is not None:
                raise GatewayConfigError(f"{env} and the value itself are both set: keep one", code="secret_set_twice")
            setattr(self, name, SecretStr(_read_secret_file(path, env)))
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_any_case(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("catalog", mode="before")
    @classmethod
    def _split_catalogs(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    # -- several URLs per network, and the credentials of each facilitator --

    def rpc_urls_for(self, network: str) -> list[str]:
        """The RPC URLs configured for ``network``, in order (empty: none configured)."""
        urls = self.rpc_urls.get(network)
        return [] if urls is None else _as_list(urls)

    def facilitators_for(self, network: str) -> list[str]:
        """``["local"]`` or the remote facilitators' URLs for ``network``, in order."""
        where = self.facilitators.get(network) or self.facilitator_url or "local"
        return [u.rstrip("/") if u != "local" else u for u in _as_list(where)]

    def facilitator_auth_for(self, url: str) -> FacilitatorAuth | None:
        """The credentials sent to the facilitator at ``url``: its entry in X402GW_FACILITATOR_AUTH,
        else a CDP JWT for CDP's own host when CDP_API_KEY_ID is set, else none. ``ValueError``
        (naming the setting, never a secret) when they cannot be used."""
        entry = self._facilitator_auth_entries().get(url.rstrip("/"))
        if entry is None and urlsplit(url).hostname == CDP_HOST and self.cdp_api_key_id:
            entry = "cdp"
        if entry is None:
            return None
        try:
            if entry == "cdp":
                if not self.cdp_api_key_id or self.cdp_api_key_secret is None:
                    raise ValueError("a CDP facilitator needs CDP_API_KEY_ID and CDP_API_KEY_SECRET (or X402GW_CDP_API_KEY_SECRET_FILE)")
                return CdpJwtAuth(self.cdp_api_key_id, self.cdp_api_key_secret.get_secret_value())
            if isinstance(entry, dict):
                return StaticHeaders(entry)
        except FacilitatorAuthError as exc:
            raise ValueError(f"credentials for facilitator {redact_url(url)}: {exc}") from None
        raise ValueError("X402GW_FACILITATOR_AUTH: each value is an object of headers or \"cdp\"")

    def _facilitator_auth_entries(self) -> dict[str, Any]:
        if self.facilitator_auth is None:
            return {}
        try:
            data = json.loads(self.facilitator_auth.get_secret_value())
        except json.JSONDecodeError as exc:  # its message names a position, never the text
            raise ValueError(f"X402GW_FACILITATOR_AUTH is not JSON (line {exc.lineno} column {exc.colno})") from None
        if not isinstance(data, dict):
            raise ValueError("X402GW_FACILITATOR_AUTH must be a JSON object: facilitator URL -> headers or \"cdp\"")
        return {str(url).rstrip("/"): value for url, value in data.items()}

    # -- views by concern (see the module docstring) --

    @property
    def server(self) -> ServerSettings:
        return ServerSettings(self.host, self.port, self.public_url, self.challenge_body, self.log_level)

    @property
    def http(self) -> HttpLimits:
        return HttpLimits(self.max_body_bytes, self.max_header_bytes, self.max_upstream_response_bytes)

    @property
    def storage(self) -> StorageSettings:
        return StorageSettings(self.database_url, self.redis_url, self.redis_prefix)

    @property
    def chain(self) -> ChainSettings:
        return ChainSettings(
            self.deployment_file, self.rpc_urls, self.settlement_key, self.refund_key,
            self.receipt_timeout_seconds, self.batch_settlement,
        )

    @property
    def facilitator(self) -> FacilitatorSettings:
        return FacilitatorSettings(
            self.facilitators, self.facilitator_url, self.facilitator_settle_timeout_seconds,
            self.serve_facilitator, self.facilitator_rate_limit, self.facilitator_pay_to, self.facilitator_assets,
        )

    @property
    def safety(self) -> SafetySettings:
        return SafetySettings(
            self.budget_per_payer, self.budget_per_payer_per_tool, self.budget_per_owner,
            self.rate_limit_per_payer, self.rate_limit_per_tool, self.rate_limit_per_client,
            self.max_price, self.policy_file,
        )

    @property
    def admin(self) -> AdminSettings:
        return AdminSettings(self.admin_token, self.readiness_timeout_seconds)
