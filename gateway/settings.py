"""Gateway settings: one typed object, env prefix ``X402GW_``, built once in ``main()``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_CATALOG = Path(__file__).resolve().parent.parent / "catalog" / "examples" / "demo.yaml"


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
    # Per-network RPC endpoints, e.g. {"eip155:8453": "https://..."} (JSON in the environment).
    rpc_urls: dict[str, str] = Field(default_factory=dict)
    # Key of the account that submits settlement transactions (pays gas). Never logged.
    settlement_key: SecretStr | None = None
    receipt_timeout_seconds: float = Field(default=30.0, gt=0)

    # Body of an unpaid 402: "v2" (the same JSON as PAYMENT-REQUIRED) or "v1" for fleets of old v1
    # clients that read only the body. The PAYMENT-REQUIRED header is v2 either way.
    challenge_body: Literal["v2", "v1"] = "v2"

    # Shared state (in-flight locks, idempotency, rate limits, budgets): memory for one process,
    # Redis for several replicas. Keys are prefixed so deployments can share a server.
    redis_url: str | None = None
    redis_prefix: str = "x402gw:"
    # Facilitators: "local" (in-process, this gateway's chain access) or a URL, per network; the
    # standard X402_FACILITATOR_URL (no prefix) selects a remote facilitator for every network.
    facilitators: dict[str, str] = Field(default_factory=dict)
    facilitator_url: str | None = Field(default=None, validation_alias="X402_FACILITATOR_URL")
    # Serve /facilitator/{supported,verify,settle} backed by the local facilitator.
    # Off by default: a public facilitator lets anyone spend this gateway's gas on their transfers.
    serve_facilitator: bool = False
    # Key of an account holding the payee's funds, used to pay refunds of `upfront` tools back on
    # chain. Without it refunds are recorded as owed. Never logged.
    refund_key: SecretStr | None = None

    max_body_bytes: int = Field(default=1_048_576, gt=0)
    max_upstream_response_bytes: int = Field(default=10 * 1_048_576, gt=0)
    log_level: str = "INFO"

    @field_validator("catalog", mode="before")
    @classmethod
    def _split_catalogs(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
