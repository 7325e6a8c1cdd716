"""Access tokens: round trip, algorithm pinning, forgery, times, rotation and replicas, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import statistics
import threading
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from sqlalchemy import event, select

from server.identity.models import SigningKey
from server.identity.secrets import Keyring
from server.identity.tokens import InvalidToken, TokenClaims, TokenService
from server.settings import AuthSettings
from server.storage.db import Database
from server.storage.migrate import upgrade
from tests.storage_backends import database_url  # noqa: F401 - fixture

T0 = 1_800_000_000.0
CLAIMS = dict(sub="u1", org="o1", scopes=["chat", "models:read"], amr=["pwd", "otp"], auth_time=int(T0) - 30)


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def env(tmp_path):
    """Build services over one database and keyring; each call is another 'replica'."""
    keyring = Keyring(secrets.token_bytes(48))
    made: list[Database] = []
    migrated: set[str] = set()

    def make(url: str | None = None, clock: Clock | None = None, **auth) -> TokenService:
        url = url or f"sqlite:///{tmp_path / 'tokens.db'}"
        if url not in migrated:
            upgrade(url)
            migrated.add(url)
        db = Database(url)
        made.append(db)
        return TokenService(db, keyring, AuthSettings(**auth), clock=clock or Clock())

    yield make
    for db in made:
        db.dispose()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(header: dict, payload: dict, sign=lambda signing_input: b"") -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


def reason(service: TokenService, token: str) -> str:
    with pytest.raises(InvalidToken) as info:
        service.decode(token)
    return info.value.reason


def stored_private_key(service: TokenService, kid: str):
    with service.db.session() as session:
        row = session.get(SigningKey, kid)
    return serialization.load_pem_private_key(
        service.keyring.box.decrypt(row.private_key_encrypted, aad=f"jwt-signing:{kid}"), password=None
    )


def full_claims(clock: Clock, **changes) -> dict:
    now = int(clock())
    base = {
        **CLAIMS,
        "jti": "j",
        "aud": "secure-model-server",
        "iss": "secure-model-server",
        "iat": now,
        "nbf": now,
        "exp": now + 60,
    }
    return {k: v for k, v in {**base, **changes}.items() if v is not None}


def test_round_trip_claims_and_default_lifetime(env, database_url):  # noqa: F811
    service = env(database_url)
    kid = service.ensure_signing_key()
    assert service.ensure_signing_key() == kid
    token, exp = service.issue(**CLAIMS, api_key="k123")
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "EdDSA", "kid": kid, "typ": "JWT"}
    claims = service.decode(token)
    assert isinstance(claims, TokenClaims)
    assert (claims.sub, claims.org, claims.scopes, claims.amr) == ("u1", "o1", ("chat", "models:read"), ("pwd", "otp"))
    assert (claims.auth_time, claims.key_id, claims.iat, claims.exp) == (int(T0) - 30, "k123", int(T0), exp)
    assert exp - claims.iat == 900 and len(claims.jti) >= 22
    raw = jwt.decode(token, options={"verify_signature": False})
    assert {"sub", "org", "scopes", "amr", "auth_time", "jti", "aud", "iss", "iat", "nbf", "exp", "api_key"} == set(raw)
    assert service.decode(service.issue(**CLAIMS)[0]).key_id is None
    assert service.issue(**CLAIMS, ttl=60)[1] == int(T0) + 60
    assert service.issue(**CLAIMS, ttl=10_000)[1] == int(T0) + 900


def test_alg_none_is_refused(env):
    service = env()
    kid = service.ensure_signing_key()
    for alg in ("none", "None", "NONE", ""):
        assert reason(service, craft({"alg": alg, "kid": kid, "typ": "JWT"}, full_claims(Clock()))) == (
            "algorithm_not_allowed"
        )


def test_hs256_with_public_key_as_secret_is_refused(env):
    service = env()
    kid = service.ensure_signing_key()
    public = stored_private_key(service, kid).public_key()
    secrets_to_try = [
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        json.dumps(service.jwks()["keys"][0]).encode(),
    ]
    for secret in secrets_to_try:
        forged = craft(
            {"alg": "HS256", "kid": kid, "typ": "JWT"},
            full_claims(Clock()),
            lambda data, s=secret: hmac.new(s, data, hashlib.sha256).digest(),
        )
        assert reason(service, forged) == "algorithm_not_allowed"


def test_rs256_and_wrong_curve_algorithms_are_refused(env):
    service = env()
    kid = service.ensure_signing_key()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(full_claims(Clock()), rsa_key, algorithm="RS256", headers={"kid": kid})
    assert reason(service, token) == "algorithm_not_allowed"
    es_service = env(jwt_algorithm="ES256")
    es_service.ensure_signing_key()
    assert reason(es_service, service.issue(**CLAIMS)[0]) == "algorithm_not_allowed"


def test_unknown_kid_and_wrong_key(env):
    service = env()
    kid = service.ensure_signing_key()
    stranger = ed25519.Ed25519PrivateKey.generate()
    claims = full_claims(Clock())
    assert reason(service, jwt.encode(claims, stranger, "EdDSA", headers={"kid": secrets.token_urlsafe(16)})) == (
        "unknown_kid"
    )
    assert reason(service, jwt.encode(claims, stranger, "EdDSA", headers={"kid": kid})) == "bad_signature"


def test_tampered_payload_keeps_signature(env):
    service = env()
    header, payload, signature = service.issue(**CLAIMS)[0].split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["scopes"].append("admin")
    assert reason(service, f"{header}.{b64(json.dumps(claims).encode())}.{signature}") == "bad_signature"


def test_malformed_and_missing_claims(env):
    service = env()
    kid = service.ensure_signing_key()
    for garbage in ("", "abc", "a.b.c", "a.b", "....", "eyJhbGciOiJFZERTQSJ9..", 42):
        assert reason(service, garbage) in {"malformed", "algorithm_not_allowed"}
    assert reason(service, "x.y.z") == "malformed"
    private = stored_private_key(service, kid)
    sign = lambda **changes: jwt.encode(full_claims(Clock(), **changes), private, "EdDSA", headers={"kid": kid})  # noqa: E731
    service.decode(sign())
    assert reason(service, sign(org=None)) == "missing_claim"
    assert reason(service, sign(jti=None)) == "missing_claim"
    assert reason(service, sign(scopes="chat")) == "malformed"
    assert reason(service, sign(auth_time="yesterday")) == "malformed"
    for extra in ({"typ": "at+jwt"}, {"crit": ["exp"]}, {"b64": False}, {"jku": "https://evil.example/jwks"}):
        token = jwt.encode(full_claims(Clock()), private, "EdDSA", headers={"kid": kid, **extra})
        assert reason(service, token) == "malformed", extra
    assert reason(service, sign(sub="x" * 9000)) == "malformed"


def test_expiry_and_not_before_use_the_injected_clock(env):
    clock = Clock()
    service = env(clock=clock)
    token, exp = service.issue(**CLAIMS)
    clock.now = exp + 4  # inside the 5 s leeway
    service.decode(token)
    clock.now = exp + 6
    assert reason(service, token) == "expired"
    early = env(clock=Clock(T0 + 100)).issue(**CLAIMS)[0]  # a replica whose clock runs ahead
    assert reason(env(clock=Clock(T0)), early) == "not_yet_valid"


def test_wrong_audience_and_issuer(env):
    service = env()
    assert reason(service, env(audience="other-service").issue(**CLAIMS)[0]) == "bad_audience"
    assert reason(service, env(issuer="https://evil.example").issue(**CLAIMS)[0]) == "bad_issuer"


def test_rotation_old_tokens_verify_until_expiry_then_key_disappears(env, database_url):  # noqa: F811
    clock = Clock()
    service = env(database_url, clock=clock)
    old_kid = service.ensure_signing_key()
    old_token, old_exp = service.issue(**CLAIMS)
    clock.now += 10
    new_kid = service.rotate()
    assert new_kid != old_kid
    assert jwt.get_unverified_header(service.issue(**CLAIMS)[0])["kid"] == new_kid
    assert service.decode(old_token).sub == "u1"
    assert [k["kid"] for k in service.jwks()["keys"]] == [new_kid, old_kid]
    long_lived = jwt.encode(
        full_claims(clock, exp=int(clock()) + 10_000),
        stored_private_key(service, old_kid),
        "EdDSA",
        headers={"kid": old_kid},
    )
    service.decode(long_lived)
    clock.now = old_exp + 6
    assert reason(service, old_token) == "expired"
    clock.now = T0 + 10 + 900 + 60 + 1  # past the retired key's expires_at
    assert [k["kid"] for k in service.jwks()["keys"]] == [new_kid]
    assert reason(service, long_lived) == "unknown_kid"


def test_second_replica_verifies_and_follows_rotation(env, database_url):  # noqa: F811
    clock = Clock()
    first, second = env(database_url, clock=clock), env(database_url, clock=clock)
    first.ensure_signing_key()
    assert second.decode(first.issue(**CLAIMS)[0]).sub == "u1"
    assert first.decode(second.issue(**CLAIMS)[0]).sub == "u1"
    clock.now += 2
    new_kid = first.rotate()
    assert second.decode(first.issue(**CLAIMS)[0]).sub == "u1"  # unknown kid -> one reload
    clock.now += 6  # second's key set is now stale: it signs with the new key
    assert jwt.get_unverified_header(second.issue(**CLAIMS)[0])["kid"] == new_kid
    assert new_kid in {k["kid"] for k in second.jwks()["keys"]}


def test_maybe_rotate_once_across_replicas(env, database_url):  # noqa: F811
    clock = Clock()
    first, second = env(database_url, clock=clock), env(database_url, clock=clock)
    kid = first.ensure_signing_key()
    assert first.maybe_rotate() is None and second.maybe_rotate() is None
    clock.now += 24 * 3600 + 1
    new_kid = first.maybe_rotate()
    assert new_kid not in (None, kid)
    assert second.maybe_rotate() is None
    with first.db.session() as session:
        assert session.scalars(select(SigningKey.kid).where(SigningKey.retired_at.is_(None))).all() == [new_kid]


def test_concurrent_ensure_creates_one_key(env, database_url):  # noqa: F811
    services = [env(database_url) for _ in range(6)]
    barrier, kids = threading.Barrier(len(services)), []

    def start(service: TokenService) -> None:
        barrier.wait()
        kids.append(service.ensure_signing_key())

    threads = [threading.Thread(target=start, args=(s,)) for s in services]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with services[0].db.session() as session:
        assert len(session.scalars(select(SigningKey)).all()) == 1
    assert len(set(kids)) == 1


def test_jwks_and_storage_hold_no_private_material(env, database_url):  # noqa: F811
    for alg, fields in (("EdDSA", {"kty", "crv", "x"}), ("ES256", {"kty", "crv", "x", "y"})):
        service = env(database_url, jwt_algorithm=alg)
        service.rotate()
        for jwk in service.jwks()["keys"]:
            assert set(jwk) == fields | {"kid", "alg", "use"} and jwk["alg"] == alg and jwk["use"] == "sig"
    with service.db.session() as session:
        rows = session.scalars(select(SigningKey)).all()
    assert rows and all("PRIVATE KEY" not in r.private_key_encrypted for r in rows)
    with pytest.raises(Exception):  # noqa: B017 - the ciphertext is bound to its kid
        service.keyring.box.decrypt(rows[0].private_key_encrypted, aad="jwt-signing:someone-else")


def test_es256_round_trip(env, database_url):  # noqa: F811
    service = env(database_url, jwt_algorithm="ES256")
    token, _ = service.issue(**CLAIMS)
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    assert service.decode(token).scopes == ("chat", "models:read")
    assert service.jwks()["keys"][0]["crv"] == "P-256"


def test_row_forged_without_the_master_secret_verifies_nothing(env):
    service = env()
    service.ensure_signing_key()
    attacker, kid = ed25519.Ed25519PrivateKey.generate(), "forged-kid"
    jwk = {
        **jwt.algorithms.OKPAlgorithm.to_jwk(attacker.public_key(), as_dict=True),
        "kid": kid,
        "alg": "EdDSA",
        "use": "sig",
    }
    with service.db.session() as session:
        session.add(SigningKey(kid=kid, algorithm="EdDSA", private_key_encrypted="v1.AAAA", public_jwk=jwk))
    token = jwt.encode(full_claims(Clock()), attacker, "EdDSA", headers={"kid": kid})
    assert reason(service, token) == "unknown_kid"
    assert kid not in {k["kid"] for k in service.jwks()["keys"]}


def test_decode_is_fast_and_queries_nothing(env, capsys):
    service = env()
    token, _ = service.issue(**CLAIMS)
    service.decode(token)
    queries = []
    event.listen(service.db.engine, "before_cursor_execute", lambda *args: queries.append(args[2]))
    samples = []
    for _ in range(2000):
        start = time.perf_counter_ns()
        service.decode(token)
        samples.append(time.perf_counter_ns() - start)
    assert queries == []
    p50 = statistics.median(samples) / 1000
    with capsys.disabled():
        print(f"\ndecode p50 over 2000: {p50:.1f} us (EdDSA)")
    assert p50 < 2000
