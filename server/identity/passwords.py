"""Password hashing (argon2id through passlib) and the password policy. The only module that hashes passwords.

Verification costs the same whether the account exists, is a service account without a password, or has a
corrupt hash: each of those verifies against a dummy hash made with the current parameters, so response time
does not reveal which accounts exist. A hash made with older parameters verifies and comes back rehashed,
so raising the cost upgrades users as they log in.

Passwords are NFKC-normalized before hashing and checking (NIST SP 800-63B 5.1.1.2), so the same passphrase
typed with composed or decomposed characters, or full-width digits, verifies.
"""

from __future__ import annotations

import secrets
import threading
import unicodedata

from passlib.context import CryptContext

MAX_LENGTH = 256
# zxcvbn's matching is super-linear in the length (about a second at 256 characters), so only a prefix is
# scored; a prefix this long that is still guessable makes the whole password guessable enough to refuse.
_SCORED_PREFIX = 72
_MIN_SCORE = 3  # zxcvbn: 3 = "safely unguessable", about 10^8 guesses or more
_MIN_LOCAL_PART = 4

_common_passwords: frozenset[str] | None = None
# zxcvbn() stores the user inputs in a module-level dictionary before matching, so concurrent calls would
# score against each other's inputs.
_zxcvbn_lock = threading.Lock()


class WeakPassword(ValueError):
    """The password fails the policy; the message says why and is safe to show to the user."""


class PasswordHasher:
    """argon2id hashing and verification with a fixed cost.

    The defaults are OWASP's first argon2id recommendation (m=19 MiB, t=2, p=1) rather than passlib's
    (m=64 MiB, t=3, p=4): on a 2-core box passlib's take ~280 ms of both cores and 64 MiB per login, so a
    handful of concurrent logins (or an attacker spraying them) would stall the server, while OWASP's take
    ~45 ms of one core and 19 MiB and still cost an offline attacker as much per guess as OWASP requires.
    """

    def __init__(self, *, time_cost: int = 2, memory_cost: int = 19456, parallelism: int = 1) -> None:
        self._context = CryptContext(
            schemes=["argon2"],
            argon2__type="ID",
            argon2__rounds=time_cost,
            argon2__memory_cost=memory_cost,
            argon2__parallelism=parallelism,
        )
        # A hash of a random password nobody knows, made once with the current parameters.
        self._dummy = self._context.hash(secrets.token_urlsafe(32))

    def hash(self, password: str) -> str:
        normalized = _normalize(password)
        if len(normalized) > MAX_LENGTH:  # verify() refuses longer ones outright, so never store one
            raise WeakPassword(f"password must be at most {MAX_LENGTH} characters long")
        return self._context.hash(normalized)

    def verify(self, password: str, stored: str | None) -> tuple[bool, str | None]:
        """Return (matches, new_hash_to_store_or_None). Never raises on a missing or malformed `stored`."""
        normalized = _normalize(password)
        if stored is not None and len(normalized) <= MAX_LENGTH:
            try:
                return self._context.verify_and_update(normalized, stored)
            except (ValueError, TypeError):
                pass  # unparseable stored hash: fall through so that the timing stays the same
        self._context.verify(normalized[:MAX_LENGTH], self._dummy)
        return False, None


def check_policy(password: str, *, min_length: int, email: str | None = None) -> None:
    """Raise WeakPassword unless the password is long enough, not common, not the email, and not guessable."""
    password = _normalize(password)
    if len(password) < min_length:
        raise WeakPassword(f"password must be at least {min_length} characters long")
    if len(password) > MAX_LENGTH:
        raise WeakPassword(f"password must be at most {MAX_LENGTH} characters long")
    lowered = password.lower()
    if lowered in _common():
        raise WeakPassword("password is one of the most common passwords; choose another")
    local_part = email.partition("@")[0].lower() if email else ""
    if len(local_part) >= _MIN_LOCAL_PART and local_part in lowered:
        raise WeakPassword("password must not contain your email address")
    inputs = [email.lower(), local_part] if email else []
    result = _score(password[:_SCORED_PREFIX], inputs)
    if result["score"] < _MIN_SCORE:
        hint = result["feedback"]["warning"] or "it is too easy to guess"
        raise WeakPassword(f"password is too easy to guess ({hint.rstrip('.')}); try a longer passphrase")


def _normalize(password: str) -> str:
    return unicodedata.normalize("NFKC", password)


def _common() -> frozenset[str]:
    """zxcvbn's list of the 30,000 most common passwords, loaded on first use."""
    global _common_passwords
    if _common_passwords is None:
        from zxcvbn.frequency_lists import FREQUENCY_LISTS

        _common_passwords = frozenset(p.lower() for p in FREQUENCY_LISTS["passwords"])
    return _common_passwords


def _score(password: str, user_inputs: list[str]) -> dict:
    import zxcvbn

    with _zxcvbn_lock:
        return zxcvbn.zxcvbn(password, user_inputs=user_inputs, max_length=_SCORED_PREFIX)
