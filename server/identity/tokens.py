"""Short-lived access tokens: compact JWTs signed with a rotating Ed25519 (or P-256) key kept in the database.

Verification pins the configured algorithm before anything else, so `alg: none`, HS256-with-the-public-key and
other algorithm-confusion tokens never reach a verifier. Keys are trusted only if their private half decrypts
under our key-encryption key (AAD `jwt-signing:<kid>`): a row inserted by someone with database write access
but without the master secret verifies nothing. Verification keys live in memory; `decode` of a token with a
known kid makes no database query. Times are checked against the injected clock, not PyJWT's.

Replicas share the key table. `issue` and `jwks` reload it when their view is older than `RELOAD_SECONDS`; an
unknown kid triggers a reload at most once per `MISS_RELOAD_SECONDS`. A retired key keeps verifying for
`token_ttl + RETIRED_GRACE_SECONDS`, which also covers a replica that signs with it until its next reload.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from server.identity.models import SigningKey
from server.settings import AuthSettings
from server.storage.db import Database

log = logging.getLogger(__name__)

LEEWAY_SECONDS = 5
MAX_TOKEN_CHARS = 8192
RELOAD_SECONDS = 5.0
MISS_RELOAD_SECONDS = 1.0
RETIRED_GRACE_SECONDS = 60
_PG_LOCK_ID = 0x4A_57_54_53  # "JWTS": serializes key creation and rotation across processes
_ALGORITHMS = {"EdDSA": jwt.algorithms.OKPAlgorithm, "ES256": jwt.algorithms.ECAlgorithm}
_HEADER_FIELDS = {"alg", "kid", "typ"}
_REQUIRED = ["exp", "iat", "nbf", "sub", "aud", "iss", "jti", "org", "scopes", "amr", "auth_time"]
# PyJWT checks times against its own clock; we check them in `_claims` against the injected one.
_OPTIONS: Any = dict(require=_REQUIRED, strict_aud=True, verify_exp=False, verify_nbf=False, verify_iat=False)
_REASONS: list[tuple[type[Exception], str]] = [  # most specific first: InvalidSignatureError is a DecodeError
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidAudienceError, "bad_audience"),
    (jwt.InvalidIssuerError, "bad_issuer"),
    (jwt.MissingRequiredClaimError, "missing_claim"),
    (jwt.InvalidSignatureError, "bad_signature"),
    (jwt.InvalidAlgorithmError, "algorithm_not_allowed"),
]


class InvalidToken(Exception):
    """The token is not acceptable; `reason` is a short machine-readable code (never shown with key details)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class TokenClaims:
    sub: str
    org: str
    scopes: tuple[str, ...]
    amr: tuple[str, ...]
    auth_time: int
    jti: str
    exp: int
    iat: int
    key_id: str | None  # the API key this token was exchanged from (claim `api_key`), so revoking it kills the token


@dataclass(frozen=True)
class _Key:
    kid: str
    public: Any
    private: Any | None  # kept only while the key may sign
    jwk: dict[str, Any]
    created_at: float
    retired: bool
    expires_at: float | None


def _epoch(value: datetime | None) -> float | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()  # SQLite returns naive UTC


def _unverified_header(token: Any) -> dict[str, Any]:
    """Only the header segment (PyJWT's parser would decode all three, twice): enough to pin `alg` and find `kid`."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or token.count(".") != 2:
        raise InvalidToken("malformed")
    segment = token.partition(".")[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, RecursionError):
        raise InvalidToken("malformed") from None
    if not isinstance(header, dict):
        raise InvalidToken("malformed")
    return header


def _str_tuple(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidToken("malformed")
    return tuple(value)


class TokenService:
    """Issues and verifies access tokens; owns the signing keys (creation, rotation, JWKS)."""

    def __init__(self, db: Database, keyring: Any, settings: AuthSettings, clock: Callable[[], float] = time.time):
        self.db, self.keyring, self.settings, self.clock = db, keyring, settings, clock
        self.algorithm = settings.jwt_algorithm
        self._pinned = [settings.jwt_algorithm]  # never derived from the token (RFC 8725 section 2.1)
        self._keys: dict[str, _Key] = {}
        self._loaded_at = float("-inf")
        self._miss_reload_at = float("-inf")
        self._rejected: set[str] = set()
        self._lock = threading.Lock()

    # -- tokens ---------------------------------------------------------------------------------------------

    def issue(
        self,
        *,
        sub: str,
        org: str,
        scopes: Iterable[str],
        amr: Iterable[str],
        auth_time: int,
        api_key: str | None = None,
        ttl: int | None = None,
    ) -> tuple[str, int]:
        """A signed token and its expiry (epoch seconds); lifetime is at most `token_ttl_seconds`."""
        lifetime = self.settings.token_ttl_seconds if ttl is None else min(ttl, self.settings.token_ttl_seconds)
        if lifetime <= 0:
            raise ValueError("ttl must be positive")
        key = self._signing_key()
        now = int(self.clock())
        claims: dict[str, Any] = {"sub": sub, "org": org, "scopes": list(scopes), "amr": list(amr)}
        claims |= {"auth_time": int(auth_time), "jti": secrets.token_urlsafe(16), "aud": self.settings.audience}
        claims |= {"iss": self.settings.issuer, "iat": now, "nbf": now, "exp": now + lifetime}
        if api_key is not None:
            claims["api_key"] = api_key
        token = jwt.encode(claims, key.private, algorithm=self.algorithm, headers={"kid": key.kid, "typ": "JWT"})
        return token, claims["exp"]

    def decode(self, token: str) -> TokenClaims:
        """Verify signature, algorithm, audience, issuer and times; raise InvalidToken(reason) otherwise."""
        header = _unverified_header(token)
        if header.get("alg") != self.algorithm:  # before any key is touched
            raise InvalidToken("algorithm_not_allowed")
        kid = header.get("kid")
        if not isinstance(kid, str) or header.get("typ", "JWT") != "JWT" or not header.keys() <= _HEADER_FIELDS:
            raise InvalidToken("malformed")  # e.g. `crit`, `b64`, `jku`: nothing we sign carries them
        now = self.clock()
        key = self._keys.get(kid) or self._reload_on_miss(kid, now)
        if key is None or (key.expires_at is not None and key.expires_at <= now):
            raise InvalidToken("unknown_kid")
        try:
            aud, iss = self.settings.audience, self.settings.issuer
            payload = jwt.decode(token, key.public, algorithms=self._pinned, options=_OPTIONS, audience=aud, issuer=iss)
        except jwt.InvalidTokenError as exc:
            raise InvalidToken(next((r for t, r in _REASONS if isinstance(exc, t)), "malformed")) from None
        return self._claims(payload, now)

    def _claims(self, p: dict[str, Any], now: float) -> TokenClaims:
        if not all(type(p[name]) is int for name in ("exp", "iat", "nbf", "auth_time")):  # not bool, not float
            raise InvalidToken("malformed")
        if p["exp"] <= now - LEEWAY_SECONDS:
            raise InvalidToken("expired")
        if p["nbf"] > now + LEEWAY_SECONDS or p["iat"] > now + LEEWAY_SECONDS:
            raise InvalidToken("not_yet_valid")
        api_key = p.get("api_key")
        if not isinstance(p["org"], str) or not (api_key is None or isinstance(api_key, str)):
            raise InvalidToken("malformed")
        scopes, amr = _str_tuple(p["scopes"]), _str_tuple(p["amr"])
        return TokenClaims(p["sub"], p["org"], scopes, amr, p["auth_time"], p["jti"], p["exp"], p["iat"], api_key)

    # -- keys -----------------------------------------------------------------------------------------------

    def jwks(self) -> dict[str, list[dict[str, Any]]]:
        """Public JWKs of every key that still verifies, newest first (no private material)."""
        self._reload_if_stale()
        now = self.clock()
        keys = sorted(self._keys.values(), key=lambda k: k.created_at, reverse=True)
        return {"keys": [dict(k.jwk) for k in keys if k.expires_at is None or k.expires_at > now]}

    def ensure_signing_key(self) -> str:
        """The active key's kid, creating one if there is none. Safe when several processes start at once."""
        return self._rotate_unless(lambda active: True)[0]

    def rotate(self) -> str:
        """Make a new signing key; older ones retire and verify until their tokens have expired."""
        return self._rotate_unless(lambda active: False)[0]

    def maybe_rotate(self) -> str | None:
        """Rotate if the active key is older than `signing_key_rotation_hours` (for a periodic task)."""
        max_age = self.settings.signing_key_rotation_hours * 3600
        self._reload_if_stale()
        newest = self._newest_active()
        if newest is not None and self.clock() - newest.created_at < max_age:
            return None  # the common case: no write lock taken
        kid, rotated = self._rotate_unless(lambda active: self.clock() - (_epoch(active.created_at) or 0) < max_age)
        return kid if rotated else None

    def _rotate_unless(self, keep: Callable[[SigningKey], bool]) -> tuple[str, bool]:
        """Under the cross-process key lock: keep the active key if there is one and `keep(it)`, else rotate.

        PostgreSQL: a transaction-scoped advisory lock. SQLite: a write statement takes the database-wide write
        lock (even one matching no row). Either way the active key is re-read after the lock is held, so two
        processes starting (or rotating) at once create one key, not two.
        """
        with self.db.session() as session:
            if session.get_bind().dialect.name == "postgresql":
                session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK_ID})
            else:
                session.execute(text("UPDATE signing_keys SET kid = kid WHERE 1 = 0"))
            query = select(SigningKey).where(SigningKey.retired_at.is_(None), SigningKey.algorithm == self.algorithm)
            active = session.scalars(query.order_by(SigningKey.created_at.desc(), SigningKey.kid.desc())).first()
            if active is None or not keep(active):
                kid, rotated = self._rotate(session), True
            else:
                kid, rotated = active.kid, False
        self.reload()
        return kid, rotated

    def reload(self, max_age: float = 0.0) -> None:
        """Replace the in-memory key set with the table's unless it is younger than `max_age` seconds.

        Keys already loaded are reused, so a reload costs one small query and no cryptography.
        """
        with self._lock:
            now = self.clock()
            if max_age > 0 and abs(now - self._loaded_at) < max_age:
                return  # another thread reloaded while we waited
            with self.db.session() as session:
                rows = session.scalars(select(SigningKey).where(SigningKey.algorithm == self.algorithm)).all()
            keys = {}
            for row in rows:
                expires_at = _epoch(row.expires_at)
                if expires_at is not None and expires_at <= now:
                    continue
                key = self._keys.get(row.kid) or self._load(row)
                if key is not None:
                    retired = row.retired_at is not None
                    private = None if retired else key.private  # a retired key never signs again
                    keys[row.kid] = replace(key, private=private, retired=retired, expires_at=expires_at)
            self._keys, self._loaded_at = keys, now

    def _load(self, row: SigningKey) -> _Key | None:
        if row.kid in self._rejected:
            return None
        self._rejected.add(row.kid)  # until proven good: warn once, not on every reload
        try:
            pem = self.keyring.box.decrypt(row.private_key_encrypted, aad=f"jwt-signing:{row.kid}")
            private = serialization.load_pem_private_key(pem, password=None)
        except Exception:  # a row we did not write (or a different master secret): never trust it
            log.warning("signing key %s does not decrypt under this server's key; ignored", row.kid)
            return None
        jwk = self._public_jwk(row.kid, private)
        if row.public_jwk != jwk:
            log.warning("signing key %s: stored public JWK does not match its private key; ignored", row.kid)
            return None
        self._rejected.discard(row.kid)
        return _Key(row.kid, private.public_key(), private, jwk, _epoch(row.created_at) or 0.0, False, None)

    def _public_jwk(self, kid: str, private: Any) -> dict[str, Any]:
        jwk = _ALGORITHMS[self.algorithm].to_jwk(private.public_key(), as_dict=True)
        return {**jwk, "kid": kid, "alg": self.algorithm, "use": "sig"}

    def _signing_key(self) -> _Key:
        self._reload_if_stale()
        key = self._newest_active()
        if key is None:
            self.ensure_signing_key()
            key = self._newest_active()
        if key is None:
            raise RuntimeError("no usable signing key (does the master secret match the one that made them?)")
        return key

    def _newest_active(self) -> _Key | None:
        active = [k for k in self._keys.values() if not k.retired]
        return max(active, key=lambda k: (k.created_at, k.kid), default=None)

    def _reload_if_stale(self) -> None:
        if abs(self.clock() - self._loaded_at) >= RELOAD_SECONDS:
            self.reload(max_age=RELOAD_SECONDS)

    def _reload_on_miss(self, kid: str, now: float) -> _Key | None:
        if abs(now - self._miss_reload_at) < MISS_RELOAD_SECONDS:
            return None
        self._miss_reload_at = now
        self.reload()
        return self._keys.get(kid)

    def _rotate(self, session: Session) -> str:
        now = datetime.fromtimestamp(self.clock(), UTC)
        expires = now + timedelta(seconds=self.settings.token_ttl_seconds + RETIRED_GRACE_SECONDS)
        active = update(SigningKey).where(SigningKey.retired_at.is_(None))
        session.execute(active.values(retired_at=now, expires_at=expires))
        private: Any = (
            ed25519.Ed25519PrivateKey.generate()
            if self.algorithm == "EdDSA"
            else ec.generate_private_key(ec.SECP256R1())
        )
        pem = private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        kid = secrets.token_urlsafe(16)
        row = SigningKey(kid=kid, algorithm=self.algorithm, public_jwk=self._public_jwk(kid, private), created_at=now)
        row.private_key_encrypted = self.keyring.box.encrypt(pem, aad=f"jwt-signing:{kid}")
        session.add(row)
        return kid
