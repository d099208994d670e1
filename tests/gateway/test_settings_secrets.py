"""Production settings for facilitators and RPC: several URLs per network, credentials per
facilitator URL (static headers or CDP), the settlement and refund keys from files; no secret in a
repr or an error message."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.errors import GatewayConfigError
from gateway.settings import Settings
from settlement.schemes.facilitator_auth import CdpJwtAuth, StaticHeaders

KEY = "0x" + "5e" * 32
TOKEN = "Bearer tok-3f9a7c1e"


def ed25519_secret() -> str:
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return base64.b64encode(raw + key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def test_several_urls_per_network_from_a_list_or_a_spaced_string(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X402GW_RPC_URLS", json.dumps({"eip155:8453": ["https://a.example/v2/K", "https://b.example"]}))
    monkeypatch.setenv("X402GW_FACILITATORS", json.dumps({"eip155:8453": "https://f1.example/ https://f2.example"}))
    settings = Settings()
    assert settings.rpc_urls_for("eip155:8453") == ["https://a.example/v2/K", "https://b.example"]
    assert settings.rpc_urls_for("eip155:1") == []
    assert settings.facilitators_for("eip155:8453") == ["https://f1.example", "https://f2.example"]
    assert settings.facilitators_for("eip155:1") == ["local"]
    assert Settings(facilitator_url="https://one.example").facilitators_for("eip155:1") == ["https://one.example"]
    assert Settings(rpc_urls={"eip155:1": "https://c.example"}).rpc_urls["eip155:1"] == "https://c.example"


@pytest.mark.parametrize("bad", [{"eip155:1": []}, {"eip155:1": ["https://a b"]}, {"eip155:1": [3]}])
def test_unusable_url_lists_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(GatewayConfigError, match="eip155:1"):
        Settings(rpc_urls=bad)


def test_local_cannot_be_listed_with_remote_facilitators() -> None:
    with pytest.raises(GatewayConfigError, match="local"):
        Settings(facilitators={"eip155:1": ["local", "https://f.example"]})


def test_settlement_and_refund_keys_from_files(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(KEY + "\n")
    (tmp_path / "refund").write_text(KEY.replace("5e", "6f") + "\n")
    settings = Settings(settlement_key_file=tmp_path / "key", refund_key_file=tmp_path / "refund")
    assert settings.settlement_key is not None and settings.settlement_key.get_secret_value() == KEY
    assert settings.refund_key is not None and settings.refund_key.get_secret_value() == KEY.replace("5e", "6f")
    assert KEY[2:] not in repr(settings) and KEY[2:] not in str(settings.chain)


def test_a_key_file_and_a_key_both_set_or_a_missing_file_are_refused_without_the_key(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(KEY)
    with pytest.raises(GatewayConfigError, match="both set") as both:
        Settings(settlement_key=KEY, settlement_key_file=tmp_path / "key")
    with pytest.raises(GatewayConfigError, match="cannot read") as missing:
        Settings(settlement_key_file=tmp_path / "absent")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(GatewayConfigError, match="empty"):
        Settings(refund_key_file=tmp_path / "empty")
    for raised in (both, missing):
        assert KEY[2:12] not in str(raised.value) and KEY[2:12] not in repr(raised.value)


def test_credentials_are_per_facilitator_url(tmp_path: Path) -> None:
    auth = {"https://f1.example/": {"Authorization": TOKEN}, "https://f2.example": "cdp"}
    settings = Settings(facilitator_auth=json.dumps(auth), cdp_api_key_id="kid", cdp_api_key_secret=ed25519_secret())
    f1 = settings.facilitator_auth_for("https://f1.example")
    assert isinstance(f1, StaticHeaders) and f1.headers("POST", "https://f1.example/verify") == {"Authorization": TOKEN}
    assert isinstance(settings.facilitator_auth_for("https://f2.example/"), CdpJwtAuth)
    assert settings.facilitator_auth_for("https://other.example") is None  # nobody else's credentials
    # CDP's own host gets the CDP JWT when the key is set
    assert isinstance(settings.facilitator_auth_for("https://api.cdp.coinbase.com/platform/v2/x402"), CdpJwtAuth)
    assert TOKEN not in repr(settings)
    # the same JSON from a file
    (tmp_path / "auth.json").write_text(json.dumps(auth))
    from_file = Settings(facilitator_auth_file=tmp_path / "auth.json")
    assert isinstance(from_file.facilitator_auth_for("https://f1.example"), StaticHeaders)


@pytest.mark.parametrize(
    ("auth", "says"),
    [
        ('{"https://f.example": {"Authorization": ' + json.dumps(TOKEN), r"not JSON \(line 1"),
        (json.dumps(["https://f.example", TOKEN]), "must be a JSON object"),
        (json.dumps({"https://f.example": 42}), "object of headers or"),
        (json.dumps({"https://f.example": {"Authorization": TOKEN + "\r\nX: y"}}), "single-line"),
        (json.dumps({"https://f.example": "cdp"}), "needs CDP_API_KEY_ID"),
    ],
)
def test_unusable_credentials_are_named_never_shown(auth: str, says: str) -> None:
    settings = Settings(facilitator_auth=auth)
    with pytest.raises(ValueError, match=says) as raised:
        settings.facilitator_auth_for("https://f.example")
    assert "tok-3f9a7c1e" not in str(raised.value)


def test_a_bad_cdp_secret_is_named_never_shown() -> None:
    settings = Settings(facilitator_auth=json.dumps({"https://f.example/path/KEY": "cdp"}),
                        cdp_api_key_id="kid", cdp_api_key_secret="c2VjcmV0LXNob3J0")
    with pytest.raises(ValueError, match="64 bytes") as raised:
        settings.facilitator_auth_for("https://f.example/path/KEY")
    assert "c2VjcmV0" not in str(raised.value) and "KEY" not in str(raised.value)


def test_cdp_variables_without_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = ed25519_secret()
    monkeypatch.setenv("CDP_API_KEY_ID", "organizations/o/apiKeys/k")
    (tmp_path / "cdp").write_text(secret)
    monkeypatch.setenv("X402GW_CDP_API_KEY_SECRET_FILE", str(tmp_path / "cdp"))
    settings = Settings()
    assert settings.cdp_api_key_id == "organizations/o/apiKeys/k"
    assert settings.cdp_api_key_secret is not None and settings.cdp_api_key_secret.get_secret_value() == secret
