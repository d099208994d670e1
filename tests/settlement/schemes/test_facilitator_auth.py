"""Credentials for remote facilitators: the CDP JWT decodes with PyJWT to exactly the claims and
header CDP's docs name (ES256 and EdDSA keys made here), bad secrets are refused without being
repeated, and static headers are copied per request."""

from __future__ import annotations

import base64

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from settlement.schemes.facilitator_auth import CdpJwtAuth, FacilitatorAuthError, StaticHeaders, load_cdp_secret

NOW = 1_800_000_000
URL = "https://api.cdp.coinbase.com/platform/v2/x402/settle"
KEY_ID = "organizations/org-1/apiKeys/key-1"


def es256_secret() -> tuple[str, ec.EllipticCurvePublicKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    return pem.decode(), key.public_key()


def ed25519_secret() -> tuple[str, object]:
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(seed + public).decode(), key.public_key()


@pytest.mark.parametrize(("make", "algorithm"), [(es256_secret, "ES256"), (ed25519_secret, "EdDSA")])
def test_cdp_jwt_claims_and_header(make: object, algorithm: str) -> None:
    secret, public = make()  # type: ignore[operator]
    auth = CdpJwtAuth(KEY_ID, secret, clock=lambda: NOW + 0.7)
    [(name, value)] = auth.headers("post", URL).items()
    assert name == "Authorization" and value.startswith("Bearer ")
    token = value.removeprefix("Bearer ")
    header = jwt.get_unverified_header(token)
    assert header["alg"] == algorithm and header["kid"] == KEY_ID and header["typ"] == "JWT"
    assert len(header["nonce"]) == 32 and int(header["nonce"], 16) >= 0
    claims = jwt.decode(token, public, algorithms=[algorithm], options={"verify_exp": False, "verify_nbf": False, "verify_iat": False})
    assert claims == {
        "sub": KEY_ID, "iss": "cdp", "iat": NOW, "nbf": NOW, "exp": NOW + 120,
        "uris": ["POST api.cdp.coinbase.com/platform/v2/x402/settle"],
    }


def test_each_request_gets_a_fresh_token_bound_to_its_method_and_path() -> None:
    secret, public = es256_secret()
    auth = CdpJwtAuth(KEY_ID, secret)
    first, second = auth.token("POST", URL), auth.token("POST", URL)
    assert first != second  # fresh nonce each time
    assert jwt.get_unverified_header(first)["nonce"] != jwt.get_unverified_header(second)["nonce"]
    supported = jwt.decode(auth.token("GET", "http://127.0.0.1:8123/facilitator/supported"), public, algorithms=["ES256"])
    assert supported["uris"] == ["GET 127.0.0.1:8123/facilitator/supported"]


def test_a_signature_by_another_key_does_not_verify() -> None:
    secret, _ = es256_secret()
    _, other_public = es256_secret()
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(CdpJwtAuth(KEY_ID, secret).token("POST", URL), other_public, algorithms=["ES256"])


def test_pem_with_escaped_newlines_from_an_env_file_is_accepted() -> None:
    secret, _ = es256_secret()
    _, algorithm = load_cdp_secret(secret.replace("\n", "\\n"))
    assert algorithm == "ES256"


@pytest.mark.parametrize(
    ("secret", "says"),
    [
        ("-----BEGIN EC PRIVATE KEY-----\nnot a key\n-----END EC PRIVATE KEY-----", "not an unencrypted private key"),
        ("not base64 at all!!", "neither a PEM EC key nor base64"),
        (base64.b64encode(b"x" * 32).decode(), "64 bytes"),
        (base64.b64encode(b"\x01" * 64).decode(), "does not match its seed"),
    ],
)
def test_unusable_secrets_are_refused_without_being_repeated(secret: str, says: str) -> None:
    with pytest.raises(FacilitatorAuthError) as raised:
        CdpJwtAuth(KEY_ID, secret)
    assert says in str(raised.value)
    assert secret not in str(raised.value) and secret.strip() not in repr(raised.value)


def test_a_p384_key_is_not_es256() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    with pytest.raises(FacilitatorAuthError, match="not an EC P-256 key"):
        CdpJwtAuth(KEY_ID, pem)


def test_reprs_name_no_secret() -> None:
    secret, _ = ed25519_secret()
    assert secret not in repr(CdpJwtAuth(KEY_ID, secret))
    headers = StaticHeaders({"Authorization": "Bearer s3cret-token"})
    assert "s3cret" not in repr(headers)
    sent = headers.headers("POST", URL)
    sent["Authorization"] = "changed"
    assert headers.headers("POST", URL) == {"Authorization": "Bearer s3cret-token"}


@pytest.mark.parametrize("bad", [{"X-Key": "a\r\nInjected: yes"}, {"": "v"}])
def test_static_headers_refuse_header_injection(bad: dict[str, str]) -> None:
    with pytest.raises(FacilitatorAuthError):
        StaticHeaders(bad)
