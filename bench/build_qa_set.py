"""Builds bench/data/qa_short.jsonl, the short-answer set scored by bench/qa_set.py.

Run once from a scratch virtual environment that holds exactly the pinned source packages (they are never
runtime dependencies of the project; the generated file is committed):

    python3 -m venv /tmp/qa-venv
    /tmp/qa-venv/bin/pip install countryinfo==1.0.1 us==4.0.0 periodictable==2.1.0
    /tmp/qa-venv/bin/python bench/build_qa_set.py            # writes the file, prints counts per source
    /tmp/qa-venv/bin/python bench/build_qa_set.py --check    # exit 1 unless the committed file is identical

Sources, in output order (see bench/data/README.md): country capitals (countryinfo), U.S. state capitals
(us), chemical element symbols and names (periodictable), generated arithmetic, generated sequences
(days, months, letters, numbers), and a hand-written general-knowledge set (below, written for this project).
Every question is kept only if no gold/alias answer occurs in the question itself (so echoing the question
never scores), and questions are deduplicated on their normalized text.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import TypedDict

import qa_set

OUT = Path(__file__).resolve().parent / "data" / "qa_short.jsonl"

# package -> (version read, licence). The build refuses other versions so the output is reproducible.
PINNED: dict[str, tuple[str, str]] = {
    "countryinfo": ("1.0.1", "MIT"),
    "us": ("4.0.0", "BSD-3-Clause (Copyright (c) 2014, Sunlight Labs)"),
    "periodictable": ("2.1.0", "Public domain"),
}


class Row(TypedDict):
    id: str
    question: str
    answers: list[str]


# ---- number words (aliases of numeric golds) -----------------------------------------------------------


def numeric(n: int) -> list[str]:
    return [str(n), qa_set.number_words(n)]


# ---- source 1: country capitals (countryinfo) ----------------------------------------------------------

# Kept: every country with population >= 10 million in countryinfo's data, plus European and Oceanian ones
# with >= 1 million (so the well-known smaller ones are asked too).
CAPITAL_MIN_POP = 10_000_000
CAPITAL_MIN_POP_EUROPE_OCEANIA = 1_000_000
# Entries left out: a state that no longer exists.
CAPITAL_EXCLUDE = {"Serbia and Montenegro"}
# How the country is named in the question, where countryinfo's name needs an article or is outdated.
COUNTRY_DISPLAY = {
    "United States": "the United States",
    "United Kingdom": "the United Kingdom",
    "United Arab Emirates": "the United Arab Emirates",
    "Philippines": "the Philippines",
    "Netherlands": "the Netherlands",
    "Czech Republic": "the Czech Republic",
    "Dominican Republic": "the Dominican Republic",
    "Democratic Republic of the Congo": "the Democratic Republic of the Congo",
    "Republic of Macedonia": "North Macedonia",
}
# Gold first. Where countryinfo's capital is outdated or a country has several capitals, all are accepted.
CAPITAL_ANSWERS = {
    "United States": ["Washington, D.C.", "Washington DC", "Washington"],
    "India": ["New Delhi", "Delhi"],
    "China": ["Beijing", "Peking"],
    "Vietnam": ["Hanoi", "Ha Noi"],
    "Ukraine": ["Kyiv", "Kiev"],
    "Kazakhstan": ["Astana", "Nur-Sultan"],
    "Myanmar": ["Naypyidaw", "Nay Pyi Taw", "Naypyitaw"],
    "South Africa": ["Pretoria", "Cape Town", "Bloemfontein"],
    "Bolivia": ["Sucre", "La Paz"],
    "Sri Lanka": ["Colombo", "Sri Jayawardenepura Kotte", "Kotte"],
    "Yemen": ["Sana'a", "Sanaa"],
    "Chad": ["N'Djamena", "Ndjamena"],
    "Switzerland": ["Bern", "Berne"],
    "Chile": ["Santiago", "Santiago de Chile"],
}


def country_capitals() -> list[Row]:
    import countryinfo

    rows: list[Row] = []
    data = Path(countryinfo.__file__).resolve().parent / "data"
    for f in sorted(data.glob("*.json")):
        c = json.loads(f.read_text(encoding="utf-8"))
        name, capital, pop = c.get("name"), c.get("capital"), c.get("population") or 0
        if not name or not capital or name in CAPITAL_EXCLUDE:
            continue
        big = pop >= CAPITAL_MIN_POP
        if not big and not (c.get("region") in ("Europe", "Oceania") and pop >= CAPITAL_MIN_POP_EUROPE_OCEANIA):
            continue
        answers = CAPITAL_ANSWERS.get(name, [capital])
        rows.append(
            {
                "id": "capital-" + slug(name),
                "question": f"What is the capital of {COUNTRY_DISPLAY.get(name, name)}?",
                "answers": answers,
            }
        )
    names = {json.loads(f.read_text(encoding="utf-8")).get("name") for f in data.glob("*.json")}
    stale = (set(CAPITAL_ANSWERS) | set(COUNTRY_DISPLAY) | CAPITAL_EXCLUDE) - names
    if stale:
        raise SystemExit(f"countryinfo has no country named {sorted(stale)}")
    return sorted(rows, key=lambda r: r["id"])


# ---- source 2: U.S. state capitals (us) ----------------------------------------------------------------

STATE_CAPITAL_ALIASES = {"Saint Paul": ["St. Paul"]}


def state_capitals() -> list[Row]:
    import us

    return [
        {
            "id": "state-capital-" + slug(s.name),
            "question": f"What is the capital of the U.S. state of {s.name}?",
            "answers": [s.capital, *STATE_CAPITAL_ALIASES.get(s.capital, [])],
        }
        for s in sorted(us.states.STATES, key=lambda s: s.name)
    ]


# ---- source 3: chemical elements (periodictable) -------------------------------------------------------

# Symbol questions: elements 1-30 and the well-known heavier ones. Iodine ("I") is left out: its symbol
# cannot be told apart from the pronoun.
SYMBOL_ELEMENTS = [*range(1, 31), 47, 50, 78, 79, 80, 82, 86, 88, 92]
# Name questions ("Which chemical element has the symbol Fe?"): elements 1-20 and the common metals.
NAME_ELEMENTS = [*range(1, 21), 26, 29, 30, 47, 50, 79, 80, 82]
# Accepted spellings besides periodictable's name.
ELEMENT_ALIASES = {"aluminum": ["aluminium"], "sulfur": ["sulphur"], "cesium": ["caesium"]}


def elements() -> list[Row]:
    import periodictable

    by_number = {e.number: e for e in periodictable.elements if e.number > 0}
    rows: list[Row] = []
    for z in SYMBOL_ELEMENTS:
        e = by_number[z]
        rows.append(
            {
                "id": f"element-symbol-{z:03d}",
                "question": f"What is the chemical symbol for {e.name}?",
                "answers": [e.symbol],
            }
        )
    for z in NAME_ELEMENTS:
        e = by_number[z]
        rows.append(
            {
                "id": f"element-name-{z:03d}",
                "question": f"Which chemical element has the symbol {e.symbol}?",
                "answers": [e.name, *ELEMENT_ALIASES.get(e.name, [])],
            }
        )
    return rows


# ---- source 4: generated arithmetic --------------------------------------------------------------------


def arithmetic() -> list[Row]:
    """Small sums, differences and products with exactly known answers; operands from fixed strides over
    every pair, so the set is the same on every run and Python version."""
    rows: list[Row] = []
    adds = [(a, b) for a in range(1, 13) for b in range(1, 13) if a <= b]
    for a, b in adds[::3]:
        rows.append({"id": f"arith-add-{a}-{b}", "question": f"What is {a} plus {b}?", "answers": numeric(a + b)})
    subs = [(a, 1 + (7 * a) % min(a - 1, 10)) for a in range(4, 21)]
    for a, b in [(a, b) for a, b in subs if a - b not in (a, b)]:
        rows.append({"id": f"arith-sub-{a}-{b}", "question": f"What is {a} minus {b}?", "answers": numeric(a - b)})
    muls = [(a, b) for a in range(2, 11) for b in range(2, 11) if a <= b]
    for a, b in muls[::2]:
        rows.append({"id": f"arith-mul-{a}-{b}", "question": f"What is {a} times {b}?", "answers": numeric(a * b)})
    return rows


# ---- source 5: generated sequences ---------------------------------------------------------------------

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip
ORDINALS = (
    "first", "second", "third", "fourth", "fifth", "sixth",
    "seventh", "eighth", "ninth", "tenth", "eleventh", "twelfth",
)  # fmt: skip
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def sequences() -> list[Row]:
    rows: list[Row] = []
    for i, d in enumerate(DAYS):
        rows.append(
            {
                "id": f"seq-day-after-{d.lower()}",
                "question": f"What day of the week comes after {d}?",
                "answers": [DAYS[(i + 1) % 7]],
            }
        )
        rows.append(
            {
                "id": f"seq-day-before-{d.lower()}",
                "question": f"What day of the week comes before {d}?",
                "answers": [DAYS[(i - 1) % 7]],
            }
        )
    for i, m in enumerate(MONTHS):
        rows.append(
            {
                "id": f"seq-month-after-{m.lower()}",
                "question": f"What month comes after {m}?",
                "answers": [MONTHS[(i + 1) % 12]],
            }
        )
        rows.append(
            {
                "id": f"seq-month-before-{m.lower()}",
                "question": f"What month comes before {m}?",
                "answers": [MONTHS[(i - 1) % 12]],
            }
        )
        rows.append(
            {
                "id": f"seq-month-ordinal-{i + 1:02d}",
                "question": f"What is the {ORDINALS[i]} month of the year?",
                "answers": [m],
            }
        )
    # Golds "A" and "I" are left out: the article and the pronoun would match them.
    for i, letter in enumerate(LETTERS[:-1]):
        nxt = LETTERS[i + 1]
        if nxt in "AI":
            continue
        rows.append(
            {
                "id": f"seq-letter-after-{letter.lower()}",
                "question": f"What letter comes after {letter} in the alphabet?",
                "answers": [nxt],
            }
        )
    for n in range(1, 21):
        rows.append(
            {"id": f"seq-number-after-{n}", "question": f"What number comes after {n}?", "answers": numeric(n + 1)}
        )
    return rows


# ---- source 6: hand-written general knowledge ----------------------------------------------------------

# Written for this project: very easy facts with one short gold answer (first) and the accepted aliases.
# Numeric golds are given as ints; their number words are added as aliases.
HANDWRITTEN: list[tuple[str, str, list[str] | int]] = [
    # colours
    ("color-sky", "What color is the sky on a clear day?", ["blue"]),
    ("color-grass", "What color is grass?", ["green"]),
    ("color-banana", "What color is a ripe banana?", ["yellow"]),
    ("color-snow", "What color is snow?", ["white"]),
    ("color-coal", "What color is coal?", ["black"]),
    ("color-tomato", "What color is a ripe tomato?", ["red"]),
    ("color-blood", "What color is blood?", ["red"]),
    ("color-milk", "What color is milk?", ["white"]),
    ("color-carrot", "What color is a carrot?", ["orange"]),
    ("color-lemon", "What color is a lemon?", ["yellow"]),
    ("color-chocolate", "What color is milk chocolate?", ["brown"]),
    ("color-emerald", "What color is an emerald?", ["green"]),
    ("color-ruby", "What color is a ruby?", ["red"]),
    ("color-mix-blue-yellow", "What color do you get when you mix blue and yellow?", ["green"]),
    ("color-mix-red-white", "What color do you get when you mix red and white?", ["pink"]),
    ("color-mix-red-yellow", "What color do you get when you mix red and yellow?", ["orange"]),
    ("color-mix-red-blue", "What color do you get when you mix red and blue?", ["purple", "violet"]),
    ("color-mix-black-white", "What color do you get when you mix black and white?", ["gray", "grey"]),
    # animals
    ("legs-spider", "How many legs does a spider have?", 8),
    ("legs-dog", "How many legs does a dog have?", 4),
    ("legs-insect", "How many legs does an insect have?", 6),
    ("legs-bird", "How many legs does a bird have?", 2),
    ("arms-octopus", "How many arms does an octopus have?", 8),
    ("humps-dromedary", "How many humps does a dromedary camel have?", 1),
    ("animal-moo", "Which animal says moo?", ["cow", "cattle"]),
    ("animal-meow", "Which animal says meow?", ["cat", "kitten"]),
    ("animal-woof", "Which animal says woof?", ["dog", "puppy"]),
    ("animal-oink", "Which animal says oink?", ["pig", "hog"]),
    ("sound-duck", "What sound does a duck make?", ["quack"]),
    ("sound-cow", "What sound does a cow make?", ["moo"]),
    ("sound-cat", "What sound does a cat make?", ["meow", "miaow", "mew", "purr"]),
    ("sound-dog", "What sound does a dog make?", ["woof", "bark", "arf"]),
    ("baby-dog", "What is a baby dog called?", ["puppy", "pup", "puppies"]),
    ("baby-cat", "What is a baby cat called?", ["kitten", "kitty"]),
    ("baby-cow", "What is a baby cow called?", ["calf", "calves"]),
    ("baby-sheep", "What is a baby sheep called?", ["lamb"]),
    ("baby-frog", "What is a baby frog called?", ["tadpole", "froglet", "polliwog"]),
    ("baby-kangaroo", "What is a baby kangaroo called?", ["joey"]),
    ("animal-largest", "What is the largest animal on Earth?", ["blue whale"]),
    ("animal-tallest", "What is the tallest animal in the world?", ["giraffe"]),
    ("animal-fastest", "What is the fastest land animal?", ["cheetah"]),
    ("animal-king-jungle", "Which animal is called the king of the jungle?", ["lion"]),
    ("animal-trunk", "Which animal has a long trunk?", ["elephant"]),
    ("animal-stripes", "Which horse-like animal has black and white stripes?", ["zebra"]),
    ("animal-largest-bird", "What is the largest bird in the world?", ["ostrich"]),
    ("animal-flying-mammal", "Which mammal can truly fly?", ["bat"]),
    ("animal-antarctic-bird", "Which bird lives in Antarctica and cannot fly?", ["penguin"]),
    ("animal-panda-food", "What plant do giant pandas mainly eat?", ["bamboo"]),
    ("animal-bees", "What sweet food do bees make?", ["honey"]),
    ("animal-caterpillar", "What does a caterpillar turn into?", ["butterfly", "butterflies", "moth"]),
    ("animal-spider-spins", "What does a spider spin?", ["web", "webs", "silk", "cobweb"]),
    ("animal-wolves-group", "What is a group of wolves called?", ["pack"]),
    # the human body
    ("body-fingers", "How many fingers are on one human hand?", 5),
    ("body-eyes", "How many eyes does a person have?", 2),
    ("body-toes", "How many toes does a person have in total?", 10),
    ("body-teeth", "How many teeth does an adult human usually have?", 32),
    ("body-bones", "How many bones are in the adult human body?", 206),
    ("body-heart", "Which organ pumps blood through the body?", ["heart"]),
    ("body-lungs", "Which organs do humans breathe with?", ["lungs", "lung"]),
    ("body-brain", "Which organ do humans think with?", ["brain"]),
    ("body-smell", "Which part of the face do you smell with?", ["nose"]),
    ("body-largest-organ", "What is the largest organ of the human body?", ["skin"]),
    # science and space
    ("space-home", "Which planet do we live on?", ["Earth"]),
    ("space-largest", "What is the largest planet in the solar system?", ["Jupiter"]),
    ("space-red", "Which planet is known as the Red Planet?", ["Mars"]),
    ("space-closest-sun", "Which planet is closest to the Sun?", ["Mercury"]),
    ("space-rings", "Which planet is famous for its bright rings?", ["Saturn"]),
    ("space-hottest", "What is the hottest planet in the solar system?", ["Venus"]),
    ("space-planets", "How many planets are in the solar system?", 8),
    ("space-star", "What is the star at the center of our solar system called?", ["Sun", "Sol"]),
    ("space-satellite", "What natural satellite orbits the Earth?", ["Moon", "Luna"]),
    ("space-galaxy", "What is the name of our galaxy?", ["Milky Way"]),
    ("sci-plants-gas", "Which gas do plants take in from the air to make food?", ["carbon dioxide", "CO2"]),
    ("sci-breathe-gas", "Which gas do humans need to breathe to stay alive?", ["oxygen", "O2"]),
    ("sci-air-main-gas", "What is the main gas in the air we breathe?", ["nitrogen"]),
    ("sci-frozen-water", "What is frozen water called?", ["ice"]),
    ("sci-h2o", "What is H2O commonly called?", ["water"]),
    ("sci-water-formula", "What is the chemical formula of water?", ["H2O"]),
    ("sci-freezing", "At how many degrees Celsius does water freeze?", 0),
    ("sci-boiling", "At how many degrees Celsius does water boil at sea level?", 100),
    ("sci-gravity", "What force pulls objects toward the ground?", ["gravity"]),
    ("sci-photosynthesis", "What is the process called by which plants make food from sunlight?", ["photosynthesis"]),
    ("sci-atom-center", "What is the center of an atom called?", ["nucleus"]),
    ("sci-liquid-metal", "Which metal is liquid at room temperature?", ["mercury"]),
    ("sci-hardest", "What is the hardest natural substance?", ["diamond"]),
    ("sci-relativity", "Which scientist developed the theory of relativity?", ["Einstein", "Albert Einstein"]),
    ("sci-gravitation", "Which scientist formulated the law of universal gravitation?", ["Newton", "Isaac Newton"]),
    # geography
    ("geo-largest-ocean", "What is the largest ocean on Earth?", ["Pacific", "Pacific Ocean"]),
    ("geo-longest-river-africa", "What is the longest river in Africa?", ["Nile"]),
    ("geo-largest-hot-desert", "What is the largest hot desert in the world?", ["Sahara"]),
    ("geo-tallest-mountain", "What is the tallest mountain in the world?", ["Everest", "Mount Everest"]),
    ("geo-largest-continent", "What is the largest continent?", ["Asia"]),
    ("geo-continents", "How many continents are there?", 7),
    ("geo-largest-country", "What is the largest country in the world by area?", ["Russia"]),
    ("geo-continent-egypt", "On which continent is Egypt?", ["Africa"]),
    ("geo-continent-brazil", "On which continent is Brazil?", ["South America"]),
    ("geo-continent-france", "On which continent is France?", ["Europe"]),
    ("geo-pyramids", "In which country are the pyramids of Giza?", ["Egypt"]),
    ("geo-eiffel-country", "In which country is the Eiffel Tower?", ["France"]),
    ("geo-eiffel-city", "In which city is the Eiffel Tower?", ["Paris"]),
    ("geo-liberty", "In which city is the Statue of Liberty?", ["New York", "NYC"]),
    ("geo-big-ben", "In which city is Big Ben?", ["London"]),
    ("geo-great-wall", "In which country is the Great Wall?", ["China"]),
    ("geo-taj-mahal", "In which country is the Taj Mahal?", ["India"]),
    ("geo-colosseum", "In which country is the Colosseum?", ["Italy"]),
    ("geo-fuji", "In which country is Mount Fuji?", ["Japan"]),
    ("geo-kangaroos", "Which country is famous for kangaroos?", ["Australia"]),
    ("lang-brazil", "What language is mainly spoken in Brazil?", ["Portuguese"]),
    ("lang-mexico", "What language is mainly spoken in Mexico?", ["Spanish"]),
    ("lang-france", "What language is mainly spoken in France?", ["French"]),
    ("lang-germany", "What language is mainly spoken in Germany?", ["German"]),
    ("lang-japan", "What language is mainly spoken in Japan?", ["Japanese"]),
    ("lang-italy", "What language is mainly spoken in Italy?", ["Italian"]),
    ("money-japan", "What is the currency of Japan?", ["yen"]),
    ("money-us", "What is the currency of the United States?", ["dollar", "US dollar", "USD"]),
    ("money-uk", "What is the currency of the United Kingdom?", ["pound", "pound sterling", "sterling", "GBP"]),
    ("money-eu", "What currency do most countries of the European Union use?", ["euro"]),
    ("money-india", "What is the currency of India?", ["rupee", "Indian rupee"]),
    ("money-china", "What is the currency of China?", ["yuan", "renminbi", "RMB"]),
    ("money-russia", "What is the currency of Russia?", ["ruble", "rouble"]),
    # time, measures, shapes, numbers
    ("time-week-days", "How many days are in a week?", 7),
    ("time-year-months", "How many months are in a year?", 12),
    ("time-day-hours", "How many hours are in a day?", 24),
    ("time-hour-minutes", "How many minutes are in an hour?", 60),
    ("time-minute-seconds", "How many seconds are in a minute?", 60),
    ("time-leap-year-days", "How many days are in a leap year?", 366),
    ("time-year-weeks", "How many weeks are in a year?", 52),
    ("time-century", "How many years are in a century?", 100),
    ("time-decade", "How many years are in a decade?", 10),
    ("measure-dozen", "How many items are in a dozen?", 12),
    ("measure-cents", "How many cents are in a dollar?", 100),
    ("measure-cm", "How many centimeters are in a meter?", 100),
    ("measure-m", "How many meters are in a kilometer?", 1000),
    ("measure-g", "How many grams are in a kilogram?", 1000),
    ("measure-right-angle", "How many degrees are in a right angle?", 90),
    ("measure-circle", "How many degrees are in a full circle?", 360),
    ("shape-triangle-sides", "How many sides does a triangle have?", 3),
    ("shape-square-sides", "How many sides does a square have?", 4),
    ("shape-pentagon-sides", "How many sides does a pentagon have?", 5),
    ("shape-hexagon-sides", "How many sides does a hexagon have?", 6),
    ("shape-octagon-sides", "How many sides does an octagon have?", 8),
    ("shape-three-sides", "What shape has three sides?", ["triangle"]),
    ("shape-ball", "What shape is a ball?", ["sphere", "round", "circle"]),
    ("count-bicycle-wheels", "How many wheels does a bicycle have?", 2),
    ("count-tricycle-wheels", "How many wheels does a tricycle have?", 3),
    ("count-soccer-players", "How many players does a soccer team have on the field?", 11),
    ("count-guitar-strings", "How many strings does a standard guitar have?", 6),
    ("count-piano-keys", "How many keys does a standard piano have?", 88),
    ("count-rainbow-colors", "How many colors are in a rainbow?", 7),
    ("count-alphabet", "How many letters are in the English alphabet?", 26),
    ("num-smallest-prime", "What is the smallest prime number?", 2),
    ("num-sqrt-9", "What is the square root of 9?", 3),
    ("num-sqrt-16", "What is the square root of 16?", 4),
    ("num-sqrt-25", "What is the square root of 25?", 5),
    ("num-sqrt-100", "What is the square root of 100?", 10),
    ("num-half-10", "What is half of 10?", 5),
    ("num-double-6", "What is double 6?", 12),
    ("alphabet-last", "What is the last letter of the English alphabet?", ["Z"]),
    # opposites
    ("opposite-hot", "What is the opposite of hot?", ["cold"]),
    ("opposite-up", "What is the opposite of up?", ["down"]),
    ("opposite-big", "What is the opposite of big?", ["small", "little", "tiny"]),
    ("opposite-day", "What is the opposite of day?", ["night"]),
    ("opposite-black", "What is the opposite of black?", ["white"]),
    ("opposite-fast", "What is the opposite of fast?", ["slow"]),
    ("opposite-happy", "What is the opposite of happy?", ["sad", "unhappy"]),
    ("opposite-open", "What is the opposite of open?", ["closed", "shut", "close"]),
    ("opposite-left", "What is the opposite of left?", ["right"]),
    ("opposite-north", "What is the opposite of north?", ["south"]),
    ("opposite-east", "What is the opposite of east?", ["west"]),
    ("opposite-heavy", "What is the opposite of heavy?", ["light"]),
    ("opposite-wet", "What is the opposite of wet?", ["dry"]),
    ("opposite-full", "What is the opposite of full?", ["empty"]),
    ("opposite-love", "What is the opposite of love?", ["hate", "hatred"]),
    ("opposite-win", "What is the opposite of win?", ["lose", "loss"]),
    ("opposite-tall", "What is the opposite of tall?", ["short"]),
    ("opposite-before", "What is the opposite of before?", ["after"]),
    ("opposite-true", "What is the opposite of true?", ["false"]),
    ("opposite-rich", "What is the opposite of rich?", ["poor"]),
    ("opposite-push", "What is the opposite of push?", ["pull"]),
    ("opposite-inside", "What is the opposite of inside?", ["outside"]),
    ("opposite-early", "What is the opposite of early?", ["late"]),
    ("opposite-clean", "What is the opposite of clean?", ["dirty"]),
    # words
    ("plural-mouse", "What is the plural of mouse?", ["mice"]),
    ("plural-child", "What is the plural of child?", ["children"]),
    ("plural-foot", "What is the plural of foot?", ["feet"]),
    ("plural-tooth", "What is the plural of tooth?", ["teeth"]),
    ("plural-goose", "What is the plural of goose?", ["geese"]),
    ("plural-woman", "What is the plural of woman?", ["women"]),
    ("word-same-meaning", "What do you call a word that means the same as another word?", ["synonym"]),
    ("word-opposite-meaning", "What do you call a word that means the opposite of another word?", ["antonym"]),
    # everyday life, people, culture
    ("life-morning-meal", "What is the first meal of the day called?", ["breakfast"]),
    ("life-pilot", "What do you call a person who flies an airplane?", ["pilot", "aviator"]),
    ("life-vet", "What do you call a doctor who treats animals?", ["vet", "veterinarian", "veterinary surgeon"]),
    ("life-teacher", "What do you call a person who teaches children at school?", ["teacher"]),
    ("life-chalk", "What do you write with on a blackboard?", ["chalk"]),
    ("life-igloo", "What is a house made of snow blocks called?", ["igloo"]),
    ("food-guacamole", "What fruit is the main ingredient of guacamole?", ["avocado"]),
    ("food-wine", "What fruit is wine made from?", ["grape", "grapes"]),
    ("food-doctor-away", "Which fruit a day keeps the doctor away?", ["apple"]),
    ("season-after-winter", "Which season comes after winter?", ["spring"]),
    ("season-after-summer", "Which season comes after summer?", ["autumn", "fall"]),
    ("season-coldest", "Which season is the coldest?", ["winter"]),
    ("season-hottest", "Which season is the hottest?", ["summer"]),
    ("sport-wimbledon", "Which sport is played at Wimbledon?", ["tennis"]),
    ("sport-shuttlecock", "In which sport do players hit a shuttlecock?", ["badminton"]),
    ("sport-wickets", "Which sport is played with a bat and wickets?", ["cricket"]),
    ("music-piano", "Which musical instrument has black and white keys and strings struck by hammers?", ["piano"]),
    ("people-romeo", "Who wrote Romeo and Juliet?", ["Shakespeare", "William Shakespeare"]),
    ("people-mona-lisa", "Who painted the Mona Lisa?", ["Leonardo da Vinci", "da Vinci", "Leonardo"]),
    ("people-first-president", "Who was the first president of the United States?", ["George Washington"]),
]


def handwritten() -> list[Row]:
    return [
        {"id": "gk-" + key, "question": q, "answers": numeric(a) if isinstance(a, int) else list(a)}
        for key, q, a in HANDWRITTEN
    ]


# ---- assembly ------------------------------------------------------------------------------------------

# source name -> (builder, provenance)
SOURCES = {
    "countryinfo_capitals": (country_capitals, "countryinfo"),
    "us_state_capitals": (state_capitals, "us"),
    "periodictable_elements": (elements, "periodictable"),
    "generated_arithmetic": (arithmetic, "generated"),
    "generated_sequences": (sequences, "generated"),
    "handwritten_general": (handwritten, "hand-written for this project"),
}


def slug(text: str) -> str:
    return "-".join(qa_set.normalize(text)) or "x"


def answer_in_question(question: str, answer: str) -> bool:
    """Whether echoing the question alone would score for this answer (such questions are dropped)."""
    if qa_set.Question("probe", "probe", question, (answer,)).numeric:
        return float(answer) in qa_set.numbers(question)
    return qa_set.mentions(question, answer)


def check_versions() -> None:
    for pkg, (want, _) in PINNED.items():
        got = metadata.version(pkg)
        if got != want:
            sys.exit(f"{pkg} {got} is installed; this build reads {pkg}=={want} (see the module doc)")


def build() -> tuple[list[dict[str, object]], Counter[str]]:
    check_versions()
    rows: list[dict[str, object]] = []
    seen_ids: set[str] = set()
    seen_questions: set[tuple[str, ...]] = set()
    dropped: Counter[str] = Counter()
    for source, (builder, _) in SOURCES.items():
        for r in builder():
            question, answers = r["question"], r["answers"]
            key = tuple(qa_set.normalize(question))
            if key in seen_questions or any(answer_in_question(question, a) for a in answers):
                dropped[source] += 1
                continue
            if r["id"] in seen_ids:
                raise SystemExit(f"duplicate id {r['id']}")
            seen_ids.add(r["id"])
            seen_questions.add(key)
            rows.append({"id": r["id"], "source": source, "question": question, "answers": answers})
    return rows, dropped


def render(rows: list[dict[str, object]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="verify the committed file instead of writing it")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    rows, dropped = build()
    text = render(rows)
    counts = Counter(str(r["source"]) for r in rows)
    for source, (_, prov) in SOURCES.items():
        pkg = f"{prov} {PINNED[prov][0]} ({PINNED[prov][1]})" if prov in PINNED else prov
        print(f"{source:24} {counts[source]:4d} kept {dropped[source]:3d} dropped  {pkg}")
    print(f"{'total':24} {len(rows):4d}")
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} differs from what this build generates", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
