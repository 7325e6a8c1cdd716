"""Probing detection for `POST /v1/watermark/detect`: a bounded memory of recent queries' fingerprints.

A verdict-only detector still answers one bit per query, and next to a decision boundary that bit is the
colour of one token: truncate a watermarked text until the verdict is about to flip, then swap the last
token and watch it (boundary probing). Every such attack sends many near-identical queries, which is what
this module counts.

Fingerprint of a query (`fingerprint`): the set of its token 3-shingles, summarised by a MinHash
signature (64 minima of keyed 64-bit mixes, 32 bits kept), the set's size, and a keyed digest of the
exact sequence. The memory never holds text or token ids, and the keys are random per process, so a
fingerprint cannot be matched against guessed texts offline.

Near-duplicate of a remembered query: estimated overlap |A ∩ B| / min(|A|, |B|) >= `similarity`, and not
the same sequence (an exact repeat teaches nothing new). MinHash estimates the Jaccard index J; with the
two set sizes, |A ∩ B| = J (|A| + |B|) / (1 + J). Overlap rather than Jaccard so that padding every probe
with fresh filler does not dilute the match away cheaply (the filler must then outweigh the probed text,
and its random colours drown the one-token signal).

Memory (`ProbeMemory`): one ring of `per_org` fingerprints per organization (so other tenants' traffic
cannot push an organization's probes out) and one deployment-wide ring (so probes spread over several
organizations, all of which test the default key, are counted together). Organizations are kept in LRU
order up to `max_orgs`. Everything is bounded; nothing is keyed by request content.

A query is flagged when it, its organization's remembered near-duplicates within `window_seconds`, and
the number of OTHER organizations that sent near-duplicates reach `threshold`. Other organizations count
once each, so a tenant cannot get another tenant's honest query flagged by seeding variants of a text
(poisoning) unless it controls `threshold - 1` organizations; organizations are created by the owner only.
Per replica: an attacker who spreads queries over N replicas meets N times the threshold (the budgets in
`detect_guard`, which every replica shares, still bound the total).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from server.audit.service import Actor
from server.audit.sink import AuditSink

log = logging.getLogger(__name__)

SHINGLE = 3
SIGNATURE = 64
PER_ORG = 64
DEPLOYMENT = 4096
MAX_ORGS = 1024

Who = tuple[str, str]  # (org id, user id)

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (array arithmetic wraps modulo 2**64)."""
    z = z ^ (z >> np.uint64(30))
    z = z * _M1
    z = z ^ (z >> np.uint64(27))
    z = z * _M2
    return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class Fingerprint:
    signature: np.ndarray  # (SIGNATURE,) uint32
    size: int  # distinct shingles
    digest: bytes  # keyed hash of the exact token sequence


class FingerprintKeys:
    """Per-process random keys of the shingle mix, the MinHash seeds and the digest."""

    def __init__(self) -> None:
        self.shingle = np.uint64(secrets.randbits(64))
        self.seeds = np.array([secrets.randbits(64) for _ in range(SIGNATURE)], dtype=np.uint64)
        self.digest = secrets.token_bytes(32)


def fingerprint(token_ids: Sequence[int], keys: FingerprintKeys) -> Fingerprint:
    """The query's fingerprint (a few ms for 8,192 tokens; call it from a worker thread)."""
    ids = np.asarray(list(token_ids), dtype=np.int64).astype(np.uint64)
    digest = hashlib.blake2b(ids.tobytes(), key=keys.digest, digest_size=16).digest()
    if len(ids) < SHINGLE:
        ids = np.concatenate([ids, np.full(SHINGLE - len(ids), np.uint64(2**63), dtype=np.uint64)])
    h = _mix(ids[: len(ids) - SHINGLE + 1] ^ keys.shingle)
    for offset in range(1, SHINGLE):
        h = _mix(h ^ ids[offset : len(ids) - SHINGLE + 1 + offset])
    shingles = np.unique(h)
    minima = _mix(shingles[None, :] ^ keys.seeds[:, None]).min(axis=1)
    return Fingerprint((minima >> np.uint64(32)).astype(np.uint32), int(len(shingles)), digest)


class _Ring:
    """The last `capacity` fingerprints with their time and (org, user); preallocated, overwritten in turn."""

    def __init__(self, capacity: int) -> None:
        self.signatures = np.zeros((capacity, SIGNATURE), dtype=np.uint32)
        self.sizes = np.zeros(capacity, dtype=np.float64)
        self.times = np.full(capacity, -np.inf)
        self.who: list[Who] = [("", "")] * capacity
        self.digests: list[bytes] = [b""] * capacity
        self._next = 0

    def near(self, fp: Fingerprint, now: float, window: float, similarity: float, skip_org: str | None) -> list[Who]:
        live = self.times > now - window
        if not live.any():
            return []
        jaccard = (self.signatures == fp.signature).mean(axis=1)
        shared = jaccard * (self.sizes + fp.size) / (1.0 + jaccard)
        overlap = shared / np.maximum(np.minimum(self.sizes, fp.size), 1.0)
        hits = np.flatnonzero(live & (overlap >= similarity))
        return [
            self.who[i]
            for i in hits
            if self.digests[i] != fp.digest and (skip_org is None or self.who[i][0] != skip_org)
        ]

    def add(self, fp: Fingerprint, who: Who, now: float) -> None:
        i = self._next
        self.signatures[i], self.sizes[i], self.times[i] = fp.signature, fp.size, now
        self.who[i], self.digests[i] = who, fp.digest
        self._next = (i + 1) % len(self.times)


@dataclass(frozen=True)
class ProbeFinding:
    near_duplicates: int  # remembered near-identical queries of the caller's organization within the window
    other_orgs: int  # other organizations that sent near-identical queries within the window
    cluster: frozenset[Who]  # who sent them, the caller included
    flagged: bool

    @property
    def count(self) -> int:
        """What is compared with the threshold: this query, its organization's near-duplicates, and one per
        other organization (however many that organization sent)."""
        return 1 + self.near_duplicates + self.other_orgs

    def users_in_org(self, org_id: str) -> int:
        return sum(1 for org, _ in self.cluster if org == org_id)

    @property
    def orgs(self) -> int:
        return len({org for org, _ in self.cluster})


class ProbeMemory:
    """Counts near-identical detection queries per organization and deployment-wide (thread-safe)."""

    def __init__(
        self,
        similarity: float,
        threshold: int,
        window_seconds: float,
        *,
        per_org: int = PER_ORG,
        deployment: int = DEPLOYMENT,
        max_orgs: int = MAX_ORGS,
    ) -> None:
        self.similarity, self.threshold, self.window = similarity, threshold, window_seconds
        self.keys = FingerprintKeys()
        self._per_org, self._max_orgs = per_org, max_orgs
        self._orgs: OrderedDict[str, _Ring] = OrderedDict()
        self._deployment = _Ring(deployment)
        self._lock = threading.Lock()

    def observe(self, org_id: str, user_id: str, fp: Fingerprint, now: float) -> ProbeFinding:
        """Compare `fp` with the remembered queries, then remember it (flagged or not)."""
        who = (org_id, user_id)
        with self._lock:
            ring = self._orgs.pop(org_id, None) or _Ring(self._per_org)
            self._orgs[org_id] = ring  # most recently used last
            while len(self._orgs) > self._max_orgs:
                self._orgs.popitem(last=False)
            own = ring.near(fp, now, self.window, self.similarity, None)
            others = self._deployment.near(fp, now, self.window, self.similarity, org_id)  # other orgs only
            ring.add(fp, who, now)
            self._deployment.add(fp, who, now)
        other_orgs = len({org for org, _ in others})
        flagged = 1 + len(own) + other_orgs >= self.threshold
        return ProbeFinding(len(own), other_orgs, frozenset([who, *own, *others]), flagged)

    def orgs_remembered(self) -> int:
        return len(self._orgs)


def report_probe(audit: AuditSink, actor: Actor, finding: ProbeFinding, *, model: str, suspended: list[str]) -> None:
    """The one place a probing finding leaves this module: a `watermark.probe` audit event (outcome
    `flagged`) and a warning. The security-event stream of a later issue hooks in here."""
    log.warning(
        "watermark detection probing: org %s, count %d (%d users in %d orgs); suspended %s",
        actor.org_id, finding.count, len(finding.cluster), finding.orgs, ", ".join(suspended),
    )  # fmt: skip
    audit.submit(
        actor,
        "watermark.probe",
        "flagged",
        model=model,
        near_duplicates=finding.near_duplicates + 1,
        other_orgs=finding.other_orgs,
        users=len(finding.cluster),
        orgs=finding.orgs,
        suspended=suspended,
    )
