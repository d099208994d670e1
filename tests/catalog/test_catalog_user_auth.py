"""A tool's user_auth: block (catalog.user_auth): what loads, and the refusals at file:line."""

from __future__ import annotations

import pytest

from catalog import CatalogError, parse_catalog
from tests.support.catalog_text import one_tool_catalog

catalog = one_tool_catalog
GOOD = "{issuer: https://auth.test, audience: orders, jwks_url: https://auth.test/jwks, scopes: [orders:read]}"


def test_no_block_means_the_service_credential() -> None:
    [tool] = parse_catalog(catalog("")).tools
    assert tool.user_auth is None


def test_a_full_block_loads_with_safe_defaults() -> None:
    text = catalog(
        "    user_auth:\n      issuer: https://auth.test\n      audience: gw\n      jwks_url: https://auth.test/jwks\n"
        "      scopes: [orders:read, profile]\n      exchange: {token_url: https://auth.test/token, audience: orders,"
        " client_id: x402gw, client_secret_env: EXCHANGE_SECRET}\n"
    )
    [tool] = parse_catalog(text).tools
    auth = tool.user_auth
    assert auth is not None and auth.scopes == ("orders:read", "profile")
    assert auth.algorithms == ("RS256", "ES256") and auth.leeway_seconds == 30
    assert auth.exchange is not None and auth.exchange.client_secret_env == "EXCHANGE_SECRET"


@pytest.mark.parametrize(("block", "code", "path"), [
    (GOOD.replace("scopes: [orders:read]", "algorithms: [HS256]"), "invalid_algorithm", "tools[0].user_auth.algorithms"),
    (GOOD.replace("scopes: [orders:read]", "algorithms: [none]"), "invalid_algorithm", "tools[0].user_auth.algorithms"),
    (GOOD.replace("https://auth.test/jwks", "file:///etc/keys"), "invalid_url", "tools[0].user_auth.jwks_url"),
    (GOOD.replace("[orders:read]", '["orders read"]'), "invalid_scope", "tools[0].user_auth.scopes"),
    (GOOD.replace("scopes: [orders:read]", "leeway_seconds: 600"), "invalid_value", "tools[0].user_auth.leeway_seconds"),
    (GOOD.replace("scopes:", "scope:"), "unknown_key", "tools[0].user_auth.scope"),
    (GOOD.replace("}", ", exchange: {token_url: https://a.test/t, audience: o, client_id: c, client_secret_env: 'no-such var'}}"),
     "invalid_value", "tools[0].user_auth.exchange.client_secret_env"),
])
def test_mistakes_are_reported_at_their_line(block: str, code: str, path: str) -> None:
    with pytest.raises(CatalogError) as error:
        parse_catalog(catalog(f"    user_auth: {block}\n"), "tools.yaml")
    issue = next(i for i in error.value.issues if i.code == code)
    assert (issue.path, issue.line, issue.file) == (path, 15, "tools.yaml")
    assert str(issue).startswith("tools.yaml:15: ")


def test_wallet_accounts_load_and_a_bad_header_is_reported_at_its_line() -> None:
    [tool] = parse_catalog(catalog("    wallet_accounts: {credentials_file: /run/secrets/a.json}\n")).tools
    assert tool.wallet_accounts is not None
    assert (tool.wallet_accounts.header, tool.wallet_accounts.prefix) == ("Authorization", "Bearer ")
    with pytest.raises(CatalogError) as error:
        parse_catalog(catalog("    wallet_accounts: {credentials_file: a.json, header: 'X Bad'}\n"), "tools.yaml")
    issue = next(i for i in error.value.issues if i.code == "invalid_value")
    assert (issue.path, issue.line) == ("tools[0].wallet_accounts.header", 15)


def test_user_auth_and_wallet_accounts_on_one_tool_conflict() -> None:
    extra = f"    user_auth: {GOOD}\n    wallet_accounts: {{credentials_file: a.json}}\n"
    with pytest.raises(CatalogError) as error:
        parse_catalog(catalog(extra), "tools.yaml")
    issue = next(i for i in error.value.issues if i.code == "user_auth_conflict")
    assert (issue.path, issue.line) == ("tools[0].wallet_accounts", 16)
