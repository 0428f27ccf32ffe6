"""A made-up product catalogue for retrieval benchmarks: paraphrased queries, look-alike passages.

Every product is a passage (brand, category, colour, two features, a price). A
query asks for one product in other words (category and features paraphrased,
no price) and its hard negative is a sibling: the same brand, category and
colour with different features. Brands are invented, so the base model knows
nothing about them; what a contrastive run can learn is the mapping between the
passages' wording and the queries' paraphrases. Training and held-out pairs come
from different brands: the held-out products are never seen in training.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

BRANDS = [
    "Voltrek", "Nimbra", "Quorix", "Halden", "Brisa", "Tamsin", "Orvel", "Kestra",
    "Lumio", "Zephyn", "Caldor", "Mireva", "Dunmar", "Pellio", "Astrin", "Corvane",
]  # fmt: skip
# (passage word, query paraphrases)
CATEGORIES = [
    ("electric kettle", ["water boiler", "thing to heat water for tea"]),
    ("blender", ["smoothie maker", "machine to mix fruit"]),
    ("vacuum cleaner", ["hoover", "machine to clean carpets"]),
    ("desk lamp", ["reading light", "light for my desk"]),
    ("backpack", ["rucksack", "bag to carry on my back"]),
    ("headphones", ["earphones", "cans to listen to music"]),
    ("coffee grinder", ["bean mill", "device to grind coffee beans"]),
    ("air purifier", ["air cleaner", "device that filters the air"]),
]
COLOURS = [
    ("black", ["dark", "black"]),
    ("white", ["white", "light-coloured"]),
    ("red", ["red", "bright red"]),
    ("grey", ["grey", "silver-grey"]),
]
FEATURES = [
    ("a two-year warranty", ["is covered for 24 months", "comes with a 2 year guarantee"]),
    (
        "free returns within 30 days",
        ["can be sent back for free for a month", "has no-cost returns"],
    ),
    ("a rechargeable battery", ["runs without a cable", "charges over USB"]),
    ("a quiet motor", ["makes very little noise", "is silent enough for night use"]),
    ("dishwasher-safe parts", ["can go in the dishwasher", "is easy to wash in a machine"]),
    ("a stainless steel body", ["has a metal casing that does not rust", "is built from steel"]),
    ("a foldable design", ["folds flat for storage", "collapses to save space"]),
    ("energy class A", ["uses little electricity", "has low power consumption"]),
    ("a child lock", ["is safe around small kids", "can be locked against children"]),
    (
        "Bluetooth connectivity",
        ["pairs wirelessly with my phone", "connects to a phone without wires"],
    ),
    ("a timer function", ["can switch itself off after a set time", "has a countdown setting"]),
    ("a carrying handle", ["is easy to carry around", "has a grip to lift it"]),
]
PASSAGE_TEMPLATES = [
    "{brand} {code} {category}: {colour}, with {f1} and {f2}. Price: {price} euros.",
    "The {colour} {brand} {category} {code} offers {f1} and {f2}, for {price} euros.",
    "{brand} {code} - {colour} {category}. Features {f1} and {f2}. {price} EUR.",
]
QUERY_TEMPLATES = [
    "Which {colour} {category} from {brand} {f1} and {f2}?",
    "I need a {brand} {category} in {colour} that {f1} and {f2}.",
    "Looking for a {colour} {category} by {brand}: one that {f2} and {f1}.",
    "{brand} {category}, {colour}, {f1}, {f2} - which model?",
]


def catalogue(seed: int = 0, per_group: int = 4) -> list[dict[str, Any]]:
    """Products: for every brand and category, ``per_group`` siblings of one colour."""
    rng = random.Random(seed)
    products = []
    for brand, (category, cat_words) in itertools.product(BRANDS, CATEGORIES):
        colour, colour_words = rng.choice(COLOURS)
        feature_pairs = rng.sample(list(itertools.combinations(range(len(FEATURES)), 2)), per_group)
        for index, (a, b) in enumerate(feature_pairs):
            code = f"{brand[:2].upper()}-{rng.randint(100, 999)}"
            price = rng.randint(19, 399)
            passage = rng.choice(PASSAGE_TEMPLATES).format(
                brand=brand, code=code, category=category, colour=colour,
                f1=FEATURES[a][0], f2=FEATURES[b][0], price=price,
            )  # fmt: skip
            query = rng.choice(QUERY_TEMPLATES).format(
                brand=brand, category=rng.choice(cat_words), colour=rng.choice(colour_words),
                f1=rng.choice(FEATURES[a][1]), f2=rng.choice(FEATURES[b][1]),
            )  # fmt: skip
            products.append(
                {"brand": brand, "category": category, "sibling": index, "query": query,
                 "passage": passage}
            )  # fmt: skip
    return products


def pairs(seed: int = 0, held_out_brands: int = 4) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)`` rows ``{"query", "positive", "negative"}``; the held-out rows
    use the last ``held_out_brands`` brands, never seen in training."""
    rng = random.Random(seed + 1)
    products = catalogue(seed)
    held = set(BRANDS[-held_out_brands:])
    groups: dict[tuple[str, str], list[dict]] = {}
    for product in products:
        groups.setdefault((product["brand"], product["category"]), []).append(product)
    train: list[dict] = []
    test: list[dict] = []
    for (brand, _), siblings in groups.items():
        for product in siblings:
            negative = rng.choice([s for s in siblings if s is not product])
            row = {
                "query": product["query"],
                "positive": product["passage"],
                "negative": negative["passage"],
            }
            (test if brand in held else train).append(row)
    rng.shuffle(train)
    return train, test


def write(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """``train.jsonl`` and ``heldout.jsonl`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    train, test = pairs(seed)
    paths = folder / "train.jsonl", folder / "heldout.jsonl"
    for path, rows in zip(paths, (train, test), strict=True):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return paths
