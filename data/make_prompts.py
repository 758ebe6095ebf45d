"""Generate the sample prompt dataset: data/prompts.parquet.

Prompts come from templates and word lists (questions, summarise-this, translate-this, ...),
with lengths from a handful of words to about 120 (at most about 310 tokens of the tiny test
model's tokenizer), plus pass-through columns a real dataset would carry. A fixed seed makes
re-runs byte-identical for a given pyarrow version.

Usage: python data/make_prompts.py [OUT] [--rows N]   (default: data/prompts.parquet, 5000)
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

DEFAULT_OUT = Path(__file__).resolve().parent / "prompts.parquet"
SEED = 20240601
ROW_GROUP_SIZE = 1000
MAX_SENTENCES = 11
START = datetime(2024, 1, 1, tzinfo=timezone.utc)
SPAN_SECONDS = 366 * 24 * 3600


def words(text: str) -> list[str]:
    return text.split()


def phrases(text: str) -> list[str]:
    """Comma-separated phrases with whitespace (including line breaks) normalised."""
    return [" ".join(part.split()) for part in text.split(",")]


NOUNS = words(
    """man woman child boy girl dog cat horse bird fish farmer teacher king city river sea
tree forest mountain road house school garden ship car train book letter song story door
window table paper water fire rain wind sun ground field farm village market bridge"""
)
ADJECTIVES = words(
    """old young small large big little long short red white black green cold warm
quiet loud happy strange bright dark early late hard simple clean wild heavy soft"""
)
VERBS = words(
    """saw found made took gave left kept built moved carried watched followed heard
opened closed painted crossed reached cut read wrote drew pulled"""
)
PLACES = phrases(
    """the river, the sea, the mountain, the old farm, the school, the city, the village,
the market, the forest, the bridge, the garden, the north road"""
)
TIMES = phrases(
    """in the morning, at night, in the summer, in the winter, after the rain, before
the war, every day, once a year, during the storm, at the end of the day"""
)
TOPICS = phrases(
    """rain, rivers, trees, mountains, farming, music, reading, the sea, school, cities,
bridges, trains, ships, birds, horses, gardens, winter, fire, paper, maps, numbers, time,
the sun, the moon, weather, money, cooking, the human body, colour, sleep"""
)

FOREIGN = {
    "de": words(
        """der die das und ist ein eine mit auf dem den von zu nicht Haus Hund Katze Wasser
    Stadt Baum Schule Buch Zeit Mann Frau Kind gross klein alt neu gut schnell heute"""
    ),
    "fr": words(
        """le la les et est un une avec sur dans de pas maison chien chat eau ville arbre
    ecole livre temps homme femme enfant grand petit vieux nouveau bon vite jour"""
    ),
    "es": words(
        """el la los las y es un una con en de no casa perro gato agua ciudad arbol escuela
    libro tiempo hombre mujer nino grande pequeno viejo nuevo bueno rapido hoy"""
    ),
}
LANG_NAMES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish"}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def sentence(rng: random.Random) -> str:
    """One plain English sentence from the word lists."""
    subject = f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    adjective = rng.choice(ADJECTIVES)
    obj = f"{article(adjective)} {adjective} {rng.choice(NOUNS)}"
    tail = rng.choice([f" near {rng.choice(PLACES)}", f" {rng.choice(TIMES)}", ""])
    return f"{subject.capitalize()} {rng.choice(VERBS)} {obj}{tail}."


def passage(rng: random.Random, sentences: int) -> str:
    return " ".join(sentence(rng) for _ in range(sentences))


def foreign_text(rng: random.Random, lang: str, count: int) -> str:
    text = " ".join(rng.choices(FOREIGN[lang], k=count))
    return text[0].upper() + text[1:] + "."


def sentence_count(rng: random.Random) -> int:
    """Mostly short passages, a long tail up to about 130 words: the tiny model's tokenizer
    spends about 2.5 tokens a word, and prompts must stay well inside its 512-token context."""
    return min(int(rng.expovariate(1 / 3.5)) + 1, MAX_SENTENCES)


def make_question(rng: random.Random) -> tuple[str, str, int]:
    topic = rng.choice(TOPICS)
    question = rng.choice(
        [
            f"What is {topic}?",
            f"Why do people care about {topic}?",
            f"What did people know about {topic} a hundred years ago?",
            f"Give three facts about {topic}.",
            f"Explain {topic} to a child in simple words.",
            f"What is the main difference between {topic} and {rng.choice(TOPICS)}?",
        ]
    )
    if rng.random() < 0.3:
        question = f"{passage(rng, rng.randint(1, 4))} {question}"
    return question, "en", 1 + len(question) // 150


def make_summarise(rng: random.Random) -> tuple[str, str, int]:
    n = min(sentence_count(rng) + 1, MAX_SENTENCES)
    instruction = rng.choice(
        [
            "Summarise the following text in one sentence:",
            "Write a short summary of this story:",
            "Read the text below and give the main idea.",
            f"Summarise this in {rng.randint(2, 5)} points:",
        ]
    )
    return f"{instruction}\n\n{passage(rng, n)}", "en", min(1 + n // 4, 5)


def make_translate(rng: random.Random) -> tuple[str, str, int]:
    source = rng.choice(["en", "en", "de", "fr", "es"])
    target = rng.choice([lang for lang in LANG_NAMES if lang != source])
    if source == "en":
        text = passage(rng, rng.randint(1, 6))
    else:
        text = foreign_text(rng, source, rng.randint(4, 40))
    prompt = f"Translate this {LANG_NAMES[source]} text into {LANG_NAMES[target]}:\n{text}"
    return prompt, source, 2 + len(text) // 200


def make_classify(rng: random.Random) -> tuple[str, str, int]:
    labels = rng.choice([("positive", "negative"), ("news", "story", "letter"), ("yes", "no")])
    text = passage(rng, rng.randint(1, 5))
    prompt = f"Classify the text as {' or '.join(labels)}. Answer with one word.\nText: {text}"
    return prompt, "en", 1 + len(labels) // 2


def make_extract(rng: random.Random) -> tuple[str, str, int]:
    thing = rng.choice(["every place", "all the animals", "each person", "the numbers", "colours"])
    text = passage(rng, min(sentence_count(rng) + 2, MAX_SENTENCES))
    return f"List {thing} named in the text below.\n\n{text}", "en", 3


def make_rewrite(rng: random.Random) -> tuple[str, str, int]:
    style = rng.choice(["simpler words", "a formal tone", "the past tense", "fewer words"])
    return f"Rewrite in {style}: {passage(rng, rng.randint(1, 3))}", "en", 2


def make_brainstorm(rng: random.Random) -> tuple[str, str, int]:
    count = rng.randint(3, 10)
    topic = rng.choice(TOPICS)
    return f"Give {count} ideas for a story about {topic}.", "en", 1


# Category name -> (generator, weight).
SOURCES: dict[str, tuple[Callable[[random.Random], tuple[str, str, int]], float]] = {
    "faq": (make_question, 0.25),
    "summarize": (make_summarise, 0.20),
    "translate": (make_translate, 0.15),
    "classify": (make_classify, 0.15),
    "extract": (make_extract, 0.10),
    "rewrite": (make_rewrite, 0.10),
    "brainstorm": (make_brainstorm, 0.05),
}

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("lang", pa.string()),
        pa.field("difficulty", pa.int8()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ]
)


def make_table(rows: int, seed: int = SEED) -> pa.Table:
    """All rows from one seeded generator, so the table depends only on (rows, seed)."""
    rng = random.Random(seed)
    names = list(SOURCES)
    weights = [SOURCES[name][1] for name in names]
    columns: dict[str, list] = {field.name: [] for field in SCHEMA}
    for i in range(1, rows + 1):
        source = rng.choices(names, weights=weights)[0]
        prompt, lang, difficulty = SOURCES[source][0](rng)
        columns["id"].append(f"q-{i:06d}")
        columns["prompt"].append(prompt)
        columns["source"].append(source)
        columns["lang"].append(lang)
        columns["difficulty"].append(min(max(difficulty, 1), 5))
        columns["created_at"].append(START + timedelta(seconds=rng.randrange(SPAN_SECONDS)))
    return pa.table(columns, schema=SCHEMA)


def write(table: pa.Table, out: Path) -> None:
    """Write to a temporary sibling then rename, so readers never see a partial file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE, compression="zstd")
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the sample prompt dataset.")
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    write(make_table(args.rows, args.seed), args.out)
    print(f"{args.out}: {args.rows} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
