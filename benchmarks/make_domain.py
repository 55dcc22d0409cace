"""The domain task of the fine-tuned float source (benchmarks/float_sources.py): a customer's message about an order
turned into a JSON record with fixed fields. Writes benchmarks/data/orders-train.jsonl and orders-eval.jsonl, rows of
{"prompt", "expected", "schema"} as `slmops deploy --domain` and `--calibration` read them. Seeded: the same files on
every machine. The held-out rows use first names, surnames and products the training rows never saw, so a model
that only memorised the training rows does not pass them.

    python benchmarks/make_domain.py        # writes the two files (they are shipped; run it after changing this)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).parent / "data"
TRAIN, EVAL = DATA / "orders-train.jsonl", DATA / "orders-eval.jsonl"
SEED = 0
TRAIN_ROWS, EVAL_ROWS = 400, 60

PROBLEMS = {
    "damaged": ["arrived broken", "came with a cracked {p}", "was smashed in the box", "arrived damaged"],
    "late": ["still has not arrived", "is two weeks late", "never showed up on the promised day", "is overdue"],
    "wrong_item": ["turned out to be the wrong item", "was not the {p} I ordered", "came in the wrong colour"],
    "missing_part": ["is missing a part", "came without its cable", "arrived with pieces missing"],
    "billing": ["was charged twice", "was billed at the wrong price", "shows a charge I do not recognise"],
}
WANTS = {
    "refund": ["I want my money back.", "Please refund me.", "A refund, please.", "I would like a refund."],
    "replacement": ["Please send a new one.", "I want a replacement.", "Can you ship me another {p}?"],
    "cancel": ["Cancel the order, please.", "Please cancel it.", "I no longer want it, cancel everything."],
    "update": ["Can you tell me what is going on?", "Please give me an update.", "Where is it now?"],
}
OPENINGS = [
    "Hi, this is {n}.",
    "Hello, my name is {n}.",
    "{n} here.",
    "Good morning, I am {n}.",
    "Dear team, {n} writing.",
]
BODIES = [
    "My order #{o} ({p}) {problem}.",
    "Order {o}: the {p} {problem}.",
    "The {p} from order number {o} {problem}.",
    "About order {o}, the {p} {problem}.",
]
# Split so that the held-out rows meet names and products the training rows never saw.
FIRST = [
    "Maria",
    "Luca",
    "Ana",
    "Jon",
    "Mei",
    "Omar",
    "Sara",
    "Tomas",
    "Ines",
    "Ravi",
    "Elena",
    "Piotr",
    "Aiko",
    "Noah",
]
LAST = ["Rossi", "Popescu", "Novak", "Smith", "Chen", "Haddad", "Berg", "Silva", "Kumar", "Ionescu", "Horvat", "Lee"]
PRODUCTS = ["lamp", "kettle", "desk chair", "phone case", "blender", "backpack", "monitor", "toaster", "bookshelf"]
EVAL_FIRST, EVAL_LAST, EVAL_PRODUCTS = (
    ["Zofia", "Kwame", "Lucia", "Hugo"],
    ["Mazur", "Okafor", "Ferrari"],
    ["drone", "rug"],
)

SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {"type": "string"},
        "order_id": {"type": "integer"},
        "problem": {"enum": list(PROBLEMS)},
        "wants": {"enum": list(WANTS)},
    },
    "required": ["customer", "order_id", "problem", "wants"],
    "additionalProperties": False,
}
INSTRUCTION = "Turn this customer message into an order record (JSON: customer, order_id, problem, wants).\n\n"


def row(rng: random.Random, first: list[str], last: list[str], products: list[str]) -> dict:
    name, product, order = f"{rng.choice(first)} {rng.choice(last)}", rng.choice(products), rng.randint(10000, 99999)
    problem, wants = rng.choice(list(PROBLEMS)), rng.choice(list(WANTS))
    body = rng.choice(BODIES).format(o=order, p=product, problem=rng.choice(PROBLEMS[problem]).format(p=product))
    message = " ".join([rng.choice(OPENINGS).format(n=name), body, rng.choice(WANTS[wants]).format(p=product)])
    expected = {"customer": name, "order_id": order, "problem": problem, "wants": wants}
    return {"prompt": INSTRUCTION + message, "expected": expected, "schema": SCHEMA}


def make(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows)."""
    rng = random.Random(seed)
    train = [row(rng, FIRST, LAST, PRODUCTS) for _ in range(TRAIN_ROWS)]
    held_out = [row(rng, EVAL_FIRST, EVAL_LAST, EVAL_PRODUCTS) for _ in range(EVAL_ROWS)]
    return train, held_out


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    DATA.mkdir(exist_ok=True)
    for path, rows in zip((TRAIN, EVAL), make(), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
