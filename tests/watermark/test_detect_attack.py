"""Green-list learning attacks on the detection API, measured.

1. Score oracle (the tester's attack): a fixed prefix plus one candidate token; the change in the green
   count (`tokens_scored` x `green_fraction`) gives the candidate's colour. Against the answer the route
   used to give (every field of the detector's result) it recovers every colour and forges a text the
   detector reports as watermarked; through the hardened route, over a whole day's budget, it learns
   nothing (its labels are coin flips: accuracy inside the binomial interval of 0.5).
2. Boundary probing: truncate a watermarked text to where the verdict flips, then swap the last token and
   read the verdict. Without the probe screen it recovers the colours; with it (the defaults) the
   attacker is suspended within `detect_probe_threshold` queries and recovers no better than chance.

Every attacker below sees only what a client sees; ground truth comes from the real detector with the key.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from scipy import stats

from server.watermark.detector import detect
from server.watermark.types import KeyMaterial
from tests.watermark.detect_support import ASCII, Detect, as_text, colour, detect_app, watermarked

Query = Callable[[list[int]], dict[str, Any] | None]  # None: the server refused the query
SEED = 2024
CANDIDATES = ASCII  # 128 candidate tokens
KEY = bytes.fromhex("5eed0f1a2b3c4d5e6f708192a3b4c5d6")  # the deployment key of every test here
NO_PROBE_SCREEN = {"detect_probe_threshold": 10**6}


def old_answer(key: KeyMaterial) -> Query:
    """The route's former answer: every aggregate of the detector's result, detected or not."""

    def query(ids: list[int]) -> dict[str, Any]:
        r = detect(ids, [key], 257, threshold=1e-4, min_tokens=16)
        return {
            "detected": r.detected, "scheme": r.scheme, "key_id": r.key_id, "p_value": r.p_value, "z": r.z,
            "tokens_scored": r.tokens_scored, "green_fraction": r.green_fraction,
        }  # fmt: skip

    return query


def route(wm: Detect, headers: dict[str, str], refusals: list[str]) -> Query:
    """The hardened route, as an ordinary caller sends it (text), 2.5 s apart (inside the minute budget)."""

    def query(ids: list[int]) -> dict[str, Any] | None:
        resp = wm.post(headers, text=as_text(ids))
        wm.clock.advance(2.5)
        if resp.status_code == 429:
            refusals.append(resp.json()["error"]["code"])
            return None
        assert resp.status_code == 200, resp.text
        return resp.json()

    return query


class ScoreOracleAttacker:
    """Learns colours from the change in the green count when one candidate is appended."""

    def __init__(self, query: Query) -> None:
        self.query = query
        self.queries = 0
        self.answered = 0
        self.refused = False
        self.last_detected = False

    def _green_count(self, ids: list[int]) -> tuple[int, int] | None:
        """(tokens scored, green tokens) as the answer reveals them, or None."""
        if self.refused:
            return None
        self.queries += 1
        answer = self.query(ids)
        if answer is None:
            self.refused = True
            return None
        self.answered += 1
        self.last_detected = answer.get("detected") is True
        n, fraction = answer.get("tokens_scored"), answer.get("green_fraction")
        if not isinstance(n, int) or not isinstance(fraction, float):
            return None
        return n, round(fraction * n)

    def colour(self, prefix: list[int], base: tuple[int, int] | None, candidate: int) -> bool | None:
        after = self._green_count([*prefix, candidate])
        if base is None or after is None or after[0] != base[0] + 1:
            return None
        return after[1] > base[1]

    def learn(self, prefix: list[int], candidates: list[int]) -> dict[int, bool | None]:
        base = self._green_count(prefix)
        return {c: self.colour(prefix, base, c) for c in candidates}

    def forge(self, start: list[int], max_queries: int, rng: random.Random) -> list[int]:
        """Extend `start` with tokens the oracle calls green until it says detected (or the budget ends)."""
        text = list(start)
        while self.queries < max_queries and not self.refused:
            base = self._green_count(text)
            if self.last_detected:
                return text
            for c in rng.sample(CANDIDATES, len(CANDIDATES)):
                if self.queries >= max_queries or self.refused:
                    break
                if self.colour(text, base, c):
                    text.append(c)
                    break
        return text


def accuracy_against_truth(
    labels: dict[int, bool | None], truth: dict[int, bool], rng: random.Random
) -> tuple[int, int, int]:
    """(correct, total, informative): a label the attacker could not read is its best guess, a coin flip."""
    correct = informative = 0
    for c, label in labels.items():
        informative += label is not None
        guess = label if label is not None else rng.random() < 0.5
        correct += guess == truth[c]
    return correct, len(labels), informative


def chance(correct: int, total: int) -> float:
    """Two-sided binomial test of 'no better than a coin': the p-value (> 0.01: inside the 99% interval)."""
    return float(stats.binomtest(correct, total, 0.5).pvalue)


# -- 1. the score oracle ---------------------------------------------------------------------------------
@pytest.fixture
def key(tmp_path) -> KeyMaterial:
    with detect_app(tmp_path) as wm:
        return wm.pin_default_key(KEY)


def test_the_old_answer_leaks_every_colour_and_lets_a_forger_pass(key):
    rng = random.Random(SEED)
    prefix = [rng.choice(ASCII) for _ in range(40)]
    attacker = ScoreOracleAttacker(old_answer(key))
    labels = attacker.learn(prefix, CANDIDATES)
    truth = {c: colour(key, prefix, c) for c in CANDIDATES}
    correct, total, informative = accuracy_against_truth(labels, truth, rng)
    read = [c for c, label in labels.items() if label is not None]
    assert attacker.queries == 129 and len(read) == informative >= 100  # the rest repeat a scored hash input
    assert all(labels[c] == truth[c] for c in read)
    assert chance(correct, total) < 1e-20

    forger = ScoreOracleAttacker(old_answer(key))
    start = [rng.choice(ASCII) for _ in range(20)]
    forged = forger.forge(start, 400, rng)
    result = detect(forged, [key], 257)
    assert result.detected and result.p_value < 1e-4, (len(forged), result)  # forged in forger.queries queries
    assert forger.queries < 400


def test_through_the_route_a_whole_days_budget_learns_nothing(tmp_path):
    with detect_app(tmp_path, **NO_PROBE_SCREEN) as wm:  # only the verdict-only answer and the budget
        key, refusals = wm.pin_default_key(KEY), []
        rng = random.Random(SEED)
        prefix = [rng.choice(ASCII) for _ in range(40)]
        attacker = ScoreOracleAttacker(route(wm, wm.key(wm.user("acme")), refusals))
        labels = attacker.learn(prefix, CANDIDATES)
        truth = {c: colour(key, prefix, c) for c in CANDIDATES}
        correct, total, informative = accuracy_against_truth(labels, truth, rng)
        assert attacker.answered == 129 and informative == 0
        assert chance(correct, total) > 0.01

        start = [rng.choice(ASCII) for _ in range(20)]
        forged = attacker.forge(start, 10_000, rng)  # runs until the day's budget (500 per user) is spent
        assert refusals == ["insufficient_quota"] and attacker.answered == 500
        assert forged == start and not detect(forged, [key], 257).detected


def test_through_the_route_with_defaults_the_attacker_is_suspended(tmp_path):
    with detect_app(tmp_path) as wm:
        wm.pin_default_key(KEY)
        refusals: list[str] = []
        rng = random.Random(SEED)
        prefix = [rng.choice(ASCII) for _ in range(40)]
        attacker = ScoreOracleAttacker(route(wm, wm.key(wm.user("acme")), refusals))
        labels = attacker.learn(prefix, CANDIDATES)
        assert (
            refusals == ["detection_suspended"]
            and attacker.answered < wm.app.state.settings.watermark.detect_probe_threshold
        )
        assert all(label is None for label in labels.values())
        assert [e.outcome for e in wm.audit("watermark.probe")] == ["flagged"]


# -- 2. boundary probing ---------------------------------------------------------------------------------
class BoundaryProber:
    """Finds where the verdict flips as a watermarked text is appended to unwatermarked filler (so the flip
    is the p-value crossing the threshold, not the length minimum), then reads colours off the verdict."""

    def __init__(self, query: Query) -> None:
        self.query = query
        self.answered = 0
        self.refused = False

    def detected(self, ids: list[int]) -> bool | None:
        if self.refused:
            return None
        answer = self.query(ids)
        if answer is None:
            self.refused = True
            return None
        self.answered += 1
        return bool(answer["detected"])

    def boundary(self, filler: list[int], text: list[int]) -> int | None:
        """k with filler + text[:k] detected and filler + text[:k - 1] not (bisection)."""
        lo, hi = 0, len(text)
        if self.detected(filler) is not False or self.detected(filler + text) is not True:
            return None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            verdict = self.detected(filler + text[:mid])
            if verdict is None:
                return None
            lo, hi = (lo, mid) if verdict else (mid, hi)
        return hi

    def learn(
        self, filler: list[int], text: list[int], candidates: list[int]
    ) -> tuple[list[int], dict[int, bool | None]]:
        k = self.boundary(filler, text)
        if k is None:
            return filler + text, {c: None for c in candidates}
        prefix = filler + text[: k - 1]
        return prefix, {c: self.detected([*prefix, c]) for c in candidates}


def _boundary_attack(wm: Detect, rng: random.Random) -> tuple[BoundaryProber, list[str], int, int, int]:
    key, refusals = wm.pin_default_key(KEY), []
    text = watermarked(key, 200, seed=SEED)
    filler = [rng.choice(ASCII) for _ in range(60)]
    assert detect(text, [key], 257).detected and not detect(filler, [key], 257).detected
    prober = BoundaryProber(route(wm, wm.key(wm.user("acme")), refusals))
    prefix, labels = prober.learn(filler, text, CANDIDATES)
    truth = {c: colour(key, prefix, c) for c in CANDIDATES}
    correct, total, informative = accuracy_against_truth(labels, truth, rng)
    return prober, refusals, correct, total, informative


def test_boundary_probing_reads_colours_when_nothing_watches_for_it(tmp_path):
    with detect_app(tmp_path, **NO_PROBE_SCREEN) as wm:
        prober, refusals, correct, total, informative = _boundary_attack(wm, random.Random(SEED))
    assert refusals == [] and informative == total
    assert correct >= 0.9 * total and chance(correct, total) < 1e-15


def test_boundary_probing_is_stopped_by_the_probe_screen(tmp_path):
    with detect_app(tmp_path) as wm:
        threshold = wm.app.state.settings.watermark.detect_probe_threshold
        prober, refusals, correct, total, informative = _boundary_attack(wm, random.Random(SEED))
        assert refusals == ["detection_suspended"]
        assert prober.answered < threshold  # the bisection is a run of near-identical queries itself
        assert informative < threshold and chance(correct, total) > 0.01
        flagged = wm.audit("watermark.probe")
        assert len(flagged) == 1 and flagged[0].details["suspended"] == ["user"]
