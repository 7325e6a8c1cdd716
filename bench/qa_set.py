"""The short-answer question set (bench/data/qa_short.jsonl) and its scoring rule.

Stdlib only, so a study script run from bench/ can `import qa_set` with nothing else installed.

    questions = load()
    ok = is_correct(model_answer_text, questions[0])

Scoring rule (`is_correct`), strict but fair:

1. The *answer region* is the first sentence of the answer: leading whitespace and an "Answer:"/"A:" label are
   dropped, as is a leading sentence that merely repeats the question; the text is cut at the first newline
   or sentence end (".", "!" or "?" followed by a space; abbreviations such as "D.C." or "St." do not end a
   sentence) and to at most `REGION_WORDS` words.
2. Numeric questions (the first gold answer is an integer): every number in the region, written in digits
   ("12", "1,000") or words ("twelve", "twenty-one", "one hundred and five"), is collected; numbers that also
   occur in the question are dropped (so "7 plus 5 is 12" is read as 12). The answer is correct iff at least
   one number is left and every one left equals the gold. "It could be 3, 4 or 5" is therefore wrong for 4.
3. Text questions: the region and each gold/alias are normalized (accents removed, lowercase, possessive
   "'s" and apostrophes dropped, dots inside abbreviations dropped, other punctuation turned into spaces,
   articles "a"/"an"/"the" dropped, number words turned into digits). The answer is correct iff some
   gold/alias occurs there as a whole-word phrase (its last word may take a plural "-s", "-es" or "y" to
   "-ies" when it has 3+ letters) that is not directly preceded by a negation ("not", "isn't", "never", ...).
   Golds of one or two letters (chemical symbols such as "Fe", letters such as "B", "UK") are matched
   case-sensitively as a whole token of the raw region, so the symbol "I" or the article "a" are not
   confused with words; the set avoids golds "A" and "I" for that reason.

Known limits: a text answer that lists several candidates ("Paris, Lyon or Nice") counts as correct when
the gold is among them; the set is scored the same way with and without the watermark, which is what the
comparison needs.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PATH = Path(__file__).resolve().parent / "data" / "qa_short.jsonl"
REGION_WORDS = 40

_ARTICLES = frozenset({"a", "an", "the"})
_NEGATIONS = frozenset({"not", "isnt", "arent", "wasnt", "werent", "never", "nor"})
_ABBREVIATIONS = frozenset({"st", "mt", "ft", "dr", "mr", "mrs", "ms", "jr", "sr", "no", "vs", "approx", "etc"})
UNIT_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
)  # fmt: skip
TENS_WORDS = ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_UNITS = {w: i for i, w in enumerate(UNIT_WORDS)}
_TENS = {w: 10 * i for i, w in enumerate(TENS_WORDS, start=2)}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000}
_NUMBER_WORDS = frozenset(_UNITS) | frozenset(_TENS) | frozenset(_SCALES)
_INT = re.compile(r"^\d+$")


@dataclass(frozen=True)
class Question:
    id: str
    source: str
    question: str
    answers: tuple[str, ...]

    @property
    def gold(self) -> str:
        return self.answers[0]

    @property
    def numeric(self) -> bool:
        return bool(_INT.match(self.answers[0]))


def load(path: str | Path | None = None) -> list[Question]:
    """Questions in file order; raises ValueError on a malformed line."""
    out: list[Question] = []
    with Path(path or DEFAULT_PATH).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            answers = tuple(str(a) for a in row["answers"])
            if not answers or not all(a.strip() for a in answers):
                raise ValueError(f"line {lineno}: empty answer in {row!r}")
            out.append(Question(str(row["id"]), str(row["source"]), str(row["question"]), answers))
    return out


def number_words(n: int) -> str:
    """English words for 0 <= n < 1,000,000 ("twenty-one", "three hundred sixty-five")."""
    if n < 20:
        return UNIT_WORDS[n]
    if n < 100:
        return TENS_WORDS[n // 10 - 2] + ("" if n % 10 == 0 else "-" + UNIT_WORDS[n % 10])
    if n < 1000:
        rest = n % 100
        return UNIT_WORDS[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))
    rest = n % 1000
    return number_words(n // 1000) + " thousand" + ("" if rest == 0 else " " + number_words(rest))


# ---- normalization ---------------------------------------------------------------------------------------


def _fold(text: str) -> str:
    """Accents removed, curly quotes made straight."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    return text.replace("\u2019", "'").replace("\u2018", "'")


def _number_runs(words: list[str]) -> list[tuple[int, int, int]]:
    """(start, end, value) for each run of number words ("twenty one", "one hundred and five")."""
    runs: list[tuple[int, int, int]] = []
    i = 0
    while i < len(words):
        if words[i] not in _UNITS and words[i] not in _TENS:
            i += 1
            continue
        start, total, current, prev = i, 0, 0, ""
        while i < len(words):
            w, nxt = words[i], words[i + 1] if i + 1 < len(words) else ""
            if w in _UNITS and (current % 100 == 0 or (prev in _TENS and 0 < _UNITS[w] < 10)):
                current += _UNITS[w]
            elif w in _TENS and current % 100 == 0:
                current += _TENS[w]
            elif w == "hundred" and 0 < current < 100:
                current *= 100
            elif w in _SCALES and w != "hundred" and current:
                total, current = total + current * _SCALES[w], 0
            elif w == "and" and prev in _SCALES and (nxt in _UNITS or nxt in _TENS):
                pass
            else:
                break
            prev = w
            i += 1
        runs.append((start, i, total + current))
    return runs


def normalize(text: str) -> list[str]:
    """The word tokens a text answer is matched on (rule 3 in the module doc)."""
    text = _fold(text).lower()
    text = re.sub(r"'s\b", "", text)
    text = text.replace("'", "")
    text = re.sub(r"(?<=[a-z])\.(?=[a-z])", "", text)
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)
    words = [w for w in re.split(r"[^a-z0-9]+", text) if w and w not in _ARTICLES]
    out: list[str] = []
    i = 0
    for start, end, value in _number_runs(words):
        out.extend(words[i:start])
        out.append(str(value))
        i = end
    out.extend(words[i:])
    return out


def numbers(text: str) -> list[float]:
    """Every number in the text, in order: digits ("1,000", "3.5") and number words."""
    text = _fold(text).lower()
    tokens = re.findall(r"\d+(?:,\d{3})*(?:\.\d+)?|[a-z]+", text)
    out: list[float] = []
    words: list[str] = []

    def flush() -> None:
        out.extend(float(v) for _, _, v in _number_runs(words))
        words.clear()

    for tok in tokens:
        if tok[0].isdigit():
            flush()
            out.append(float(tok.replace(",", "")))
        elif tok in _NUMBER_WORDS or tok == "and":
            words.append(tok)
        else:
            flush()
    flush()
    return out


def _ends_sentence(piece: str) -> bool:
    """Whether a piece that ends in '.', '!' or '?' really ends a sentence (not "D.C." or "St.")."""
    if not piece.endswith("."):
        return True
    last = piece.split()[-1] if piece.split() else ""
    if re.fullmatch(r"(?:[A-Za-z]\.)+", last) and len(last) > 2:
        return False
    return last[:-1].lower() not in _ABBREVIATIONS


def _sentences(text: str) -> list[str]:
    out: list[str] = []
    for line in text.splitlines():
        pending = ""
        for piece in re.split(r"(?<=[.!?])\s+", line.strip()):
            pending = f"{pending} {piece}".strip()
            if pending and _ends_sentence(pending):
                out.append(pending)
                pending = ""
        if pending:
            out.append(pending)
    return [s for s in out if s.strip()]


def answer_region(answer_text: str, question: Question | str) -> str:
    """The part of the answer that is scored (rule 1 in the module doc)."""
    qtext = question.question if isinstance(question, Question) else question
    text = re.sub(r"^\s*(?:answer|a)\s*:\s*", "", answer_text, flags=re.IGNORECASE)
    sentences = _sentences(text)
    qnorm = normalize(qtext)
    while sentences and normalize(sentences[0]) == qnorm:
        sentences.pop(0)
    if not sentences:
        return ""
    return " ".join(sentences[0].split()[:REGION_WORDS])


def _plurals(word: str) -> tuple[str, ...]:
    forms = (word + "s", word + "es")
    return (*forms, word[:-1] + "ies") if word.endswith("y") else forms


def _phrase_match(region: list[str], gold: list[str]) -> bool:
    n = len(gold)
    if not n:
        return False
    last = gold[-1]
    plural_ok = len(last) >= 3 and last.isalpha()
    for i in range(len(region) - n + 1):
        if region[i : i + n - 1] != gold[:-1]:
            continue
        w = region[i + n - 1]
        if w != last and not (plural_ok and w in _plurals(last)):
            continue
        if i > 0 and region[i - 1] in _NEGATIONS:
            continue
        return True
    return False


def _short_match(region: str, gold: str) -> bool:
    tokens = re.findall(r"[A-Za-z0-9]+", _fold(region))
    for i, tok in enumerate(tokens):
        if tok == gold and not (i > 0 and tokens[i - 1].lower() in _NEGATIONS | {"isn", "aren", "wasn"}):
            return True
    return False


def mentions(region: str, answer: str) -> bool:
    """Whether the text names this gold/alias as rule 3 of the module doc reads it."""
    a = answer.strip()
    if len(a) <= 2 and a.isalnum():
        return _short_match(region, a)
    return _phrase_match(normalize(region), normalize(a))


def is_correct(answer_text: str, question: Question) -> bool:
    """Whether the model's answer gives the question's gold answer (rules in the module doc)."""
    region = answer_region(answer_text, question)
    if not region:
        return False
    if question.numeric:
        asked = set(numbers(question.question))
        said = [n for n in numbers(region) if n not in asked]
        gold = float(question.gold)
        return bool(said) and all(n == gold for n in said)
    return any(mentions(region, a) for a in question.answers)
