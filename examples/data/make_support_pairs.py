"""Write ``support_pairs.jsonl`` and ``support_pairs_eval.jsonl``: retrieval pairs of a
made-up smart-home support knowledge base.

Every product has one support article per topic; the articles of a product look
alike (the same product name, the same sentence shapes) and a customer's
question says the same thing in other words. Each pair's hard negative is the
same product's article on the look-alike topic (a reset vs a Wi-Fi problem, the
warranty vs a return, ...). The held-out pairs are the last two products, never
seen in training: what a contrastive run can learn is how questions paraphrase
the articles' wording.

``mongars-llm demo`` trains on the copies shipped in the package
(``mongars_llm/_data/``), ``06_embedding_adapter.py`` on these. Rewrite both
after changing this file::

    python examples/data/make_support_pairs.py
"""

from __future__ import annotations

import json
from pathlib import Path

#: (name in the articles, how a customer calls it); the last two are held out
PRODUCTS = [
    ("Lumio L2 smart bulb", "Lumio bulb"),
    ("Brisa 300 air purifier", "Brisa purifier"),
    ("Kestra K5 doorbell camera", "Kestra doorbell"),
    ("Orvel T1 thermostat", "Orvel thermostat"),
    ("Tamsin R8 robot vacuum", "Tamsin vacuum"),
    ("Halden H3 wireless earbuds", "Halden earbuds"),
    ("Quorix Q6 mesh router", "Quorix router"),
    ("Pellio P1 smart plug", "Pellio plug"),
]
HELD_OUT = 2
#: topic -> (article, customer questions); {p}: the product, {q}: how a customer calls it
TOPICS = {
    "reset": (
        "Factory reset of the {p}: hold the reset button for ten seconds until the "
        "light blinks; all settings are erased.",
        [
            "how do I wipe my {q} and start over from scratch",
            "put the {q} back the way it came out of the box",
        ],
    ),
    "wifi": (
        "Wi-Fi problems with the {p}: if it cannot join your wireless network, move it "
        "closer to the router and use the 2.4 GHz band.",
        [
            "my {q} keeps dropping off the internet at home",
            "the {q} won't get online, what can I do",
        ],
    ),
    "update": (
        "Firmware updates for the {p}: updates install automatically at night; to "
        "update now, open the app and choose Check for updates.",
        [
            "how do I get the newest software onto my {q}",
            "is there a way to upgrade the {q} to the latest version",
        ],
    ),
    "power": (
        "The {p} does not turn on: check the power adapter and the outlet, then leave "
        "it charging for at least thirty minutes.",
        [
            "my {q} is completely dead and nothing happens",
            "the {q} won't start at all, no lights",
        ],
    ),
    "warranty": (
        "Warranty of the {p}: manufacturing defects are covered for two years from the "
        "date of purchase; keep your receipt.",
        [
            "is the {q} still guaranteed if it breaks after a year",
            "who pays if my {q} stops working because of a factory fault",
        ],
    ),
    "returns": (
        "Returning the {p}: you can send it back within thirty days of delivery for a "
        "full refund, in its original packaging.",
        [
            "can I send the {q} back and get my money back",
            "I changed my mind about the {q}, how do I get a refund",
        ],
    ),
    "noise": (
        "Noises from the {p}: a short buzzing or clicking sound at start-up is normal; "
        "if it continues, clean the vents and place it on a flat surface.",
        [
            "my {q} makes a weird rattling sound",
            "why is the {q} humming so loudly",
        ],
    ),
    "setup": (
        "Setting up the {p} in the app: sign in, tap Add device and scan the code on "
        "the back of the device.",
        [
            "how do I connect the {q} to my phone the first time",
            "getting started with a new {q} on my mobile",
        ],
    ),
    "cleaning": (
        "Cleaning the {p}: wipe it with a soft dry cloth; never use water, sprays or "
        "solvents on the device.",
        [
            "what is the safest way to wash the {q}",
            "the {q} is dusty and dirty, what can I wipe it with",
        ],
    ),
    "light": (
        "Status light of the {p}: a blinking red light means it lost its connection; a "
        "steady green light means it works normally.",
        [
            "what does the flashing red LED on my {q} mean",
            "the little lamp on the {q} keeps flickering red",
        ],
    ),
}
#: each topic's look-alike, the hard negative of its pairs
LOOK_ALIKE = {
    "reset": "light",
    "wifi": "setup",
    "update": "setup",
    "power": "noise",
    "warranty": "returns",
    "returns": "warranty",
    "noise": "power",
    "setup": "wifi",
    "cleaning": "noise",
    "light": "wifi",
}


def pairs() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """``(train, held_out)`` rows ``{"query", "positive", "negative"}``."""
    train: list[dict[str, str]] = []
    held_out: list[dict[str, str]] = []
    for index, (product, short) in enumerate(PRODUCTS):
        rows = held_out if index >= len(PRODUCTS) - HELD_OUT else train
        for number, (topic, (article, questions)) in enumerate(TOPICS.items()):
            negative = TOPICS[LOOK_ALIKE[topic]][0]
            rows.append(
                {
                    # the products take turns with the two phrasings of each question
                    "query": questions[(index + number) % len(questions)].format(q=short),
                    "positive": article.format(p=product),
                    "negative": negative.format(p=product),
                }
            )
    return train, held_out


def write(folder: Path) -> tuple[Path, Path]:
    """The two files, in ``folder``."""
    paths = folder / "support_pairs.jsonl", folder / "support_pairs_eval.jsonl"
    for path, rows in zip(paths, pairs(), strict=True):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return paths


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    for folder in (here, here.parents[1] / "src" / "mongars_llm" / "_data"):
        for path in write(folder):
            print(path)
