"""Probe answers decoded together: `branch_generate_ids` and `probe_answers="independent"`.

Prompts that share a long start (the absorbed history, then each probe) are
decoded in one sequence: the shared start is read once, and each step feeds
one token per unfinished prompt under a mask that lets it see the shared
start and its own prompt only. The answers must be those of each prompt
generated alone.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from absorber_memory import AbsorberConfig
from absorber_memory import generation as gen
from absorber_memory.engine import AbsorptionEngine
from absorber_memory.generation import PromptCache, branch_generate_ids, generate_batch_ids, generate_ids
from absorber_memory.probes import independent_probe_segment
from absorber_memory.testing import tiny_model

from ..conftest import FAST, chat

QUESTIONS = (" one", " two words", " three more words here", " and a fourth question that is longer still")


def prompts_after(tokenizer, start: str, questions=QUESTIONS) -> tuple[list[int], list[list[int]]]:
    shared = tokenizer(start)["input_ids"]
    return shared, [shared + tokenizer(q)["input_ids"] for q in questions]


def spy_reads(model, monkeypatch) -> list[int]:
    """The number of tokens each forward of `model` reads."""
    reads: list[int] = []
    real = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: reads.append(k["input_ids"].shape[1]) or real(*a, **k))
    return reads


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_answers_decoded_together_are_those_of_each_prompt_alone(tokenizer, attention):
    model = tiny_model(tokenizer, seed=3)
    model.config._attn_implementation = attention
    _, prompts = prompts_after(tokenizer, "the same long start of a conversation " * 8)
    alone = [generate_ids(model, tokenizer, p, 8) for p in prompts]
    assert len({tuple(a) for a in alone}) == len(prompts)  # the prompts' own tails matter
    assert branch_generate_ids(model, tokenizer, prompts, 8) == alone
    # No shared start at all, and one prompt only: the same rule.
    others = [tokenizer(t)["input_ids"] for t in ("hello there", "a different prompt", "x y")]
    assert branch_generate_ids(model, tokenizer, others, 5) == [generate_ids(model, tokenizer, p, 5) for p in others]
    assert branch_generate_ids(model, tokenizer, prompts[:1], 4) == [generate_ids(model, tokenizer, prompts[0], 4)]
    assert branch_generate_ids(model, tokenizer, [], 4) == []


def test_the_shared_start_is_read_once_and_each_step_reads_one_token_per_unfinished_prompt(
    tokenizer, model, monkeypatch
):
    shared, prompts = prompts_after(tokenizer, "a long shared history " * 12)
    cache = PromptCache()
    reads = spy_reads(model, monkeypatch)
    answers = branch_generate_ids(model, tokenizer, prompts, 6, cache=cache)
    tails = sum(len(p) - len(shared) for p in prompts)
    assert reads == [len(shared), tails] + [len(prompts)] * 5  # 6 tokens each: the last one is never read
    assert all(len(a) == 6 for a in answers)
    # Afterwards the cache holds the shared start, and a next call through it reads only the new tails.
    assert cache.ids == shared and cache.cache.get_seq_length() == len(shared)
    monkeypatch.setattr(gen, "SHARED_PREFIX_TOKENS", len(shared))
    reads.clear()
    assert branch_generate_ids(model, tokenizer, prompts[1:], 6, cache=cache) == answers[1:]
    assert reads[0] == tails - (len(prompts[0]) - len(shared))


def test_each_prompt_stops_at_its_own_eos(tokenizer, model):
    _, prompts = prompts_after(tokenizer, "a long shared history " * 12)
    free = branch_generate_ids(model, tokenizer, prompts, 8)
    stop = free[1][3]  # make the fourth token of the second answer the EOS
    stopping = SimpleNamespace(eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
    cut = branch_generate_ids(model, stopping, prompts, 8)
    assert cut == [generate_ids(model, stopping, p, 8) for p in prompts]
    assert cut[1] == free[1][:3] and stop not in sum(cut, [])
    assert any(len(a) == 8 for a in cut)  # the others ran on


def test_prompts_sharing_a_long_start_are_decoded_together_when_greedy(tokenizer, model, monkeypatch):
    from transformers import LogitsProcessorList

    shared, prompts = prompts_after(tokenizer, "the same long start " * 10)
    below = generate_batch_ids(model, tokenizer, prompts, 6)  # shared start below the threshold: one padded batch
    monkeypatch.setattr(gen, "SHARED_PREFIX_TOKENS", len(shared))
    used: list[str] = []
    real_branch, real_one = gen.branch_generate_ids, gen.PromptCache.generate_ids
    monkeypatch.setattr(gen, "branch_generate_ids", lambda *a, **k: used.append("branch") or real_branch(*a, **k))
    monkeypatch.setattr(gen.PromptCache, "generate_ids", lambda s, *a, **k: used.append("one") or real_one(s, *a, **k))
    assert generate_batch_ids(model, tokenizer, prompts, 6) == below
    assert used == ["branch"]
    used.clear()  # other generation settings: one prompt at a time through the cache, as before
    same = LogitsProcessorList([lambda ids, scores: scores])
    assert generate_batch_ids(model, tokenizer, prompts, 6, logits_processor=same) == below
    assert used == ["one"] * len(prompts)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_batch_ids(model, tokenizer, prompts, 0)


def test_sliding_window_models_are_decoded_one_prompt_at_a_time(tokenizer, model, monkeypatch):
    shared, prompts = prompts_after(tokenizer, "the same long start " * 10)
    monkeypatch.setattr(gen, "SHARED_PREFIX_TOKENS", len(shared))
    monkeypatch.setattr(model.config, "sliding_window", 64, raising=False)
    monkeypatch.setattr(gen, "branch_generate_ids", lambda *a, **k: pytest.fail("a custom mask would drop the window"))
    used: list[int] = []
    real = gen.PromptCache.generate_ids
    monkeypatch.setattr(gen.PromptCache, "generate_ids", lambda s, *a, **k: used.append(1) or real(s, *a, **k))
    assert [len(a) for a in generate_batch_ids(model, tokenizer, prompts, 4)] == [4] * len(prompts)
    assert len(used) == len(prompts)


LEAD = chat("I keep two cats.", "Lovely!")


def test_independent_answers_follow_the_lead_and_are_chained_in_one_segment():
    seen = []

    def answer_all(conversations):
        seen.append(conversations)
        return [" first ", ""]

    segment = independent_probe_segment(answer_all, ["q1", "q2"], LEAD)
    q1, q2 = {"role": "user", "content": "q1"}, {"role": "user", "content": "q2"}
    assert seen == [[LEAD + [q1], LEAD + [q2]]]  # one call: each probe straight after the lead
    replies = [{"role": "assistant", "content": "first"}, {"role": "assistant", "content": "..."}]
    assert segment == LEAD + [q1, replies[0], q2, replies[1]]
    assert independent_probe_segment(answer_all, [], LEAD) == LEAD and len(seen) == 1
    with pytest.raises(ValueError, match="returned 2 answers for 3 probes"):
        independent_probe_segment(answer_all, ["a", "b", "c"], LEAD)


CONTEXT = chat("My name is Ana and I live in Lisbon.", "Nice to meet you, Ana!")
WINDOW = chat("I keep two cats at home.", "Lovely, what are their names?", "Tom and Lila.", "Nice names.")


def streaming_round(tokenizer, monkeypatch, **config):
    built = AbsorptionEngine(
        tiny_model(tokenizer, seed=0), tokenizer=tokenizer, config=AbsorberConfig(**{**FAST, "max_steps": 4, **config})
    )
    asked: list[list[list[dict]]] = []
    real = built.generate_all
    monkeypatch.setattr(built, "generate_all", lambda p, convs, *a, **k: asked.append(convs) or real(p, convs, *a, **k))
    report = built.run_round([], CONTEXT, n_probes=3, following=WINDOW, base_teacher=True)
    return report, asked


def test_a_streaming_round_can_answer_its_probes_independently(tokenizer, monkeypatch):
    chained, asked_chained = streaming_round(tokenizer, monkeypatch)
    independent, asked = streaming_round(tokenizer, monkeypatch, probe_answers="independent")
    assert asked_chained == []  # the default asks one probe at a time, after the earlier ones
    assert len(asked) == 1 and len(asked[0]) == 3
    assert all(conv[: len(CONTEXT) + len(WINDOW)] == CONTEXT + WINDOW for conv in asked[0])
    assert [conv[len(CONTEXT) + len(WINDOW) :] for conv in asked[0]] == [
        [{"role": "user", "content": q}] for q in AbsorberConfig().probe_prompts[:3]
    ]
    window = len(AbsorptionEngine(tiny_model(tokenizer), tokenizer=tokenizer).fmt.encode_segments(WINDOW))
    assert chained.sync_tokens > window and independent.sync_tokens > window  # one segment: the window, then probes
    assert independent.final_loss < independent.initial_loss


def test_probe_answers_must_be_a_known_mode():
    with pytest.raises(ValueError, match="probe_answers"):
        AbsorberConfig(probe_answers="batched")
