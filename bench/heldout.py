"""A held-out chat task for the eval bench: records extracted from one sentence, test entities unseen.

    python bench/heldout.py FOLDER      writes FOLDER/train.jsonl (400 rows) and FOLDER/test.jsonl (60 rows)

Each row asks for a short structured answer to a sentence about a made-up person:
    user:      "Make a record: Talven Orrick was born in 1983 in Presk and works as a baker."
    assistant: "name: Talven Orrick | born: 1983 | city: Presk | job: baker"
Names and cities are built from syllables with one seeded generator; no test name or city occurs
in the training rows, so the model has to learn the format, not the facts.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SYLLABLES = ["ta", "ven", "or", "rick", "pre", "sk", "mo", "lin", "da", "ra", "ke", "bel", "zu", "non", "fi", "lo",
             "gar", "the", "in", "sa", "vo", "rem", "qui", "tal", "bro", "ne", "ul", "ash", "cor", "dell"]
JOBS = ["baker", "pilot", "teacher", "nurse", "farmer", "painter", "carpenter", "chemist", "librarian", "tailor"]


def _word(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def rows(count: int, rng: random.Random, avoid: set[str], used: set[str]) -> list[dict]:
    """`count` rows whose names and cities are not in `avoid`; the words they use are added to `used`."""
    out = []
    while len(out) < count:
        first, last, city = (_word(rng, rng.choice([2, 3])) for _ in range(3))
        if {first, last, city} & avoid:
            continue
        used |= {first, last, city}
        year, job = rng.randint(1940, 2005), rng.choice(JOBS)
        question = f"Make a record: {first} {last} was born in {year} in {city} and works as a {job}."
        answer = f"name: {first} {last} | born: {year} | city: {city} | job: {job}"
        out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return out


def write_task(folder: str | Path, train: int = 400, test: int = 60, seed: int = 0) -> tuple[Path, Path]:
    """(train.jsonl, test.jsonl) in `folder`; the test rows' names and cities are not in training."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng, in_training = random.Random(seed), set()
    paths = folder / "train.jsonl", folder / "test.jsonl"
    paths[0].write_text("".join(json.dumps(row) + "\n" for row in rows(train, rng, set(), in_training)))
    paths[1].write_text("".join(json.dumps(row) + "\n" for row in rows(test, rng, in_training, set())))
    return paths


if __name__ == "__main__":
    print(*write_task(sys.argv[1]))
