"""Settings: flat X402GW_* fields (the environment's and the constructor's names) read through typed views by concern."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from gateway.settings import (
    AdminSettings,
    ChainSettings,
    FacilitatorSettings,
    HttpLimits,
    SafetySettings,
    ServerSettings,
    Settings,
    StorageSettings,
)


def test_flat_keywords_are_read_through_the_views() -> None:
    settings = Settings(
        database_url="sqlite:///x.db", deployment_file=Path("d.json"), receipt_timeout_seconds=5,
        rate_limit_per_client="10/1s", max_price="0.1", max_header_bytes=4096, facilitator_url="http://f",
        admin_token="secret", port=9000,
    )
    assert isinstance(settings.server, ServerSettings) and settings.server.port == 9000
    assert isinstance(settings.storage, StorageSettings) and settings.storage.database_url == "sqlite:///x.db"
    assert isinstance(settings.chain, ChainSettings) and settings.chain.deployment_file == Path("d.json")
    assert settings.chain.receipt_timeout_seconds == 5
    assert isinstance(settings.facilitator, FacilitatorSettings) and settings.facilitator.url == "http://f"
    assert isinstance(settings.safety, SafetySettings) and settings.safety.max_price == Decimal("0.1")
    assert settings.safety.rate_limit_per_client is not None and settings.safety.rate_limit_per_client.requests == 10
    assert isinstance(settings.http, HttpLimits) and settings.http.max_header_bytes == 4096
    assert isinstance(settings.admin, AdminSettings) and settings.admin.token is not None
    assert settings.admin.token.get_secret_value() == "secret"


def test_environment_variable_names_are_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X402GW_REDIS_URL", "redis://r")
    monkeypatch.setenv("X402GW_BUDGET_PER_PAYER", "5.00/1d")
    monkeypatch.setenv("X402GW_FACILITATORS", '{"eip155:8453": "https://f"}')
    monkeypatch.setenv("X402_FACILITATOR_URL", "https://all")
    monkeypatch.setenv("X402GW_SERVE_FACILITATOR", "true")
    monkeypatch.setenv("X402GW_CATALOG", "a.yaml, b.yaml")
    settings = Settings()
    assert settings.storage.redis_url == "redis://r" and settings.redis_url == "redis://r"
    assert settings.safety.budget_per_payer is not None and settings.safety.budget_per_payer.window == 86_400
    assert settings.facilitator.by_network == {"eip155:8453": "https://f"} and settings.facilitator.url == "https://all"
    assert settings.facilitator.serve is True
    assert settings.catalog == [Path("a.yaml"), Path("b.yaml")]


def test_a_view_follows_a_flat_field_set_later() -> None:
    settings = Settings()
    settings.port = 1234
    assert settings.server.port == 1234
