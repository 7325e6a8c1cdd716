"""The short-answer set (bench/data/qa_short.jsonl) and its scoring rule (bench/qa_set.py)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from bench import qa_set
from bench.qa_set import Question, is_correct

DATA = Path(qa_set.__file__).resolve().parent / "data"


def q(question: str, *answers: str) -> Question:
    return Question("t", "test", question, answers)


FRANCE = q("What is the capital of France?", "Paris")
PLUS = q("What is 2 plus 2?", "4", "four")
SUM = q("What is 7 plus 5?", "12", "twelve")
SPIDER = q("How many legs does a spider have?", "8", "eight")
KM = q("How many meters are in a kilometer?", "1000", "one thousand")
AUSTRALIA = q("What is the capital of Australia?", "Canberra")
BRAZIL = q("What is the capital of Brazil?", "Brasília")
USA = q("What is the capital of the United States?", "Washington, D.C.", "Washington DC", "Washington")
MINNESOTA = q("What is the capital of the U.S. state of Minnesota?", "Saint Paul", "St. Paul")
MEXICO = q("What is the capital of Mexico?", "Mexico City")
GOLD = q("What is the chemical symbol for gold?", "Au")
LETTER = q("What letter comes after A in the alphabet?", "B")
PUPPY = q("What is a baby dog called?", "puppy", "pup")


@pytest.mark.parametrize(
    ("answer", "question"),
    [
        ("Paris", FRANCE),
        ("The capital of France is Paris.", FRANCE),
        ("PARIS!", FRANCE),
        ("Answer: Paris", FRANCE),
        ("  \nParis is the capital and largest city of France. It has the Eiffel Tower.", FRANCE),
        ("What is the capital of France? The capital of France is Paris.", FRANCE),
        ("Paris's population is about two million, and it is the capital.", FRANCE),
        ("4", PLUS),
        ("four", PLUS),
        ("Four.", PLUS),
        ("2 plus 2 is 4.", PLUS),
        ("2 + 2 = 4", PLUS),
        ("The answer is 4. That is because 2 and 2 make 4, not 5.", PLUS),
        ("7 plus 5 equals twelve.", SUM),
        ("Seven plus five is 12", SUM),
        ("A spider has eight legs.", SPIDER),
        ("Spiders have 8 legs", SPIDER),
        ("There are 1,000 meters in a kilometer.", KM),
        ("One thousand.", KM),
        ("The capital of Australia is Canberra, not Sydney.", AUSTRALIA),
        ("Brasilia", BRAZIL),
        ("The capital of Brazil is Brasília.", BRAZIL),
        ("Washington, D.C.", USA),
        ("The capital of the U.S. is Washington, D.C. It is on the Potomac.", USA),
        ("Washington DC", USA),
        ("St. Paul", MINNESOTA),
        ("The capital of Minnesota is Saint Paul.", MINNESOTA),
        ("Mexico City", MEXICO),
        ("The chemical symbol for gold is Au.", GOLD),
        ("Au", GOLD),
        ("The letter after A is B.", LETTER),
        ("Puppies", PUPPY),
        ("A baby dog is called a pup.", PUPPY),
    ],
)
def test_correct(answer: str, question: Question) -> None:
    assert is_correct(answer, question)


@pytest.mark.parametrize(
    ("answer", "question"),
    [
        ("", FRANCE),
        ("   ", FRANCE),
        ("Lyon", FRANCE),
        ("The capital of France is Lyon. Paris is its largest city.", FRANCE),
        ("Parisian cuisine is famous.", FRANCE),
        ("It is not Paris.", FRANCE),
        ("What is the capital of France?", FRANCE),
        ("It could be 3, 4 or 5", PLUS),
        ("It could be 4, 5 or 6.", PLUS),
        ("4 or 5", PLUS),
        ("5", PLUS),
        ("2 plus 2 is five.", PLUS),
        ("2 plus 2", PLUS),
        ("The answer is 14.", SUM),
        ("7 plus 5", SUM),
        ("A spider has six legs.", SPIDER),
        ("Spiders have 8 or 10 legs.", SPIDER),
        ("There are 100 meters in a kilometer.", KM),
        ("The capital of Australia is Sydney, not Canberra.", AUSTRALIA),
        ("Sydney", AUSTRALIA),
        ("Mexico", MEXICO),
        ("The capital of Mexico is Mexico.", MEXICO),
        ("The chemical symbol for gold is Ag.", GOLD),
        ("Gold comes from Australia.", GOLD),
        ("The letter after A is C.", LETTER),
        ("A", LETTER),
        ("Kitten", PUPPY),
    ],
)
def test_wrong(answer: str, question: Question) -> None:
    assert not is_correct(answer, question)


def test_numbers_in_digits_and_words() -> None:
    assert qa_set.numbers("twenty-one, 1,000, three hundred sixty-five and 3.5") == [21, 1000, 365, 3.5]
    assert qa_set.numbers("one hundred and five") == [105]
    assert qa_set.numbers("no numbers here") == []
    assert qa_set.number_words(21) == "twenty-one"
    assert qa_set.number_words(365) == "three hundred sixty-five"
    assert qa_set.number_words(1000) == "one thousand"
    for n in (0, 7, 13, 40, 99, 100, 206, 366, 1000, 4321):
        assert qa_set.numbers(qa_set.number_words(n)) == [n]


def test_normalize() -> None:
    assert qa_set.normalize("The Brasília!") == ["brasilia"]
    assert qa_set.normalize("Washington, D.C.") == ["washington", "dc"]
    assert qa_set.normalize("Sana'a and Earth's moon") == ["sanaa", "and", "earth", "moon"]
    assert qa_set.normalize("twenty-one apples") == ["21", "apples"]


# ---- the committed data file ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def questions() -> list[Question]:
    return qa_set.load()


def test_loads_with_enough_questions(questions: list[Question]) -> None:
    assert len(questions) >= 300
    assert qa_set.load(DATA / "qa_short.jsonl") == questions


def test_sources_are_several_and_each_meaningful(questions: list[Question]) -> None:
    counts = Counter(x.source for x in questions)
    assert len(counts) >= 2
    assert sum(1 for n in counts.values() if n >= 0.1 * len(questions)) >= 2
    assert all(n >= 20 for n in counts.values()), counts


def test_no_duplicates(questions: list[Question]) -> None:
    ids = [x.id for x in questions]
    assert len(ids) == len(set(ids))
    texts = [tuple(qa_set.normalize(x.question)) for x in questions]
    assert len(texts) == len(set(texts))


def test_every_question_is_well_formed(questions: list[Question]) -> None:
    for x in questions:
        assert re.fullmatch(r"[a-z0-9-]+", x.id), x
        assert x.question.strip().endswith("?"), x
        assert x.answers and all(a.strip() for a in x.answers), x
        assert x.gold.upper() not in ("A", "I"), x


def test_gold_scores_and_echo_does_not(questions: list[Question]) -> None:
    for x in questions:
        assert is_correct(x.gold, x), x
        assert is_correct(f"The answer is {x.gold}.", x), x
        if x.numeric:
            assert is_correct(qa_set.number_words(int(x.gold)), x), x
        assert not is_correct(x.question.rstrip("?") + ".", x), x
        assert not is_correct("I don't know.", x), x


def test_file_is_canonical_jsonl() -> None:
    lines = (DATA / "qa_short.jsonl").read_text(encoding="utf-8").splitlines()
    for line in lines:
        row = json.loads(line)
        assert list(row) == ["id", "source", "question", "answers"]
        assert json.dumps(row, ensure_ascii=False) == line


def test_readme_counts_match(questions: list[Question]) -> None:
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    for source, n in Counter(x.source for x in questions).items():
        assert re.search(rf"\|\s*`{source}`\s*\|\s*{n}\s*\|", readme), f"README has no row for {source} = {n}"
    assert re.search(rf"\*\*total\*\*\s*\|\s*\*\*{len(questions)}\*\*", readme)
