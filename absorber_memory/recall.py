"""Reading weight memory back as text: what an adapter alone holds.

A memory in the weights cannot be listed like rows in a table, but it can be
asked. `recall` puts a few generic questions to the adapted model with no
conversation in the prompt (only the system prefix), and the same questions
to the base model beside it, so the difference is what the adapter adds. The
answers are only as good as the model: a 135M model paraphrases loosely.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .chat import ChatFormat, Message, validate_messages
from .errors import InvalidMessageError
from .generation import generate_text

#: Asked by default; generic, so they never leak evaluation questions into anything.
RECALL_QUESTIONS: tuple[str, ...] = (
    "What do you know about me?",
    "What have I told you about myself?",
    "What did we talk about before?",
)


@dataclass
class Recalled:
    """One question, answered by the adapted model (`absorbed`) and by the base model (`base`)."""

    question: str
    absorbed: str
    base: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def recall_answers(
    model: Any,
    tokenizer: Any,
    fmt: ChatFormat,
    prefix: list[Message],
    questions: list[str] | None = None,
    max_new_tokens: int = 48,
) -> list[Recalled]:
    """Answer each question with `model` (a PEFT model, adapter active) and with its adapter disabled.

    Raises `InvalidMessageError` for an empty or malformed question list.
    """
    asked = list(RECALL_QUESTIONS) if questions is None else questions
    if isinstance(asked, str) or not isinstance(asked, (list, tuple)) or not asked:
        raise InvalidMessageError(f"`questions` must be a non-empty list of strings, got {asked!r}")
    prompts = validate_messages([{"role": "user", "content": q} for q in asked], name="questions")
    out = []
    for prompt in prompts:
        ids = fmt.encode(prefix, [prompt], add_generation_prompt=True)
        absorbed = generate_text(model, tokenizer, ids, max_new_tokens).strip()
        with model.disable_adapter():
            base = generate_text(model, tokenizer, ids, max_new_tokens).strip()
        out.append(Recalled(prompt["content"], absorbed, base))
    return out
