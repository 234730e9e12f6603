"""Isolation under concurrent async load: 8 sessions x 20 turns with background absorption.

Two things are checked. At inference, every generation runs with exactly
its own session's adapter active (or none, before its first absorption),
never a slot holding another session's weights. In the weights, a
distinctive fact planted in session A never reaches session B: B's adapter,
trained next to A and six others on two workers, is bit-identical to B's
adapter trained alone, so B's probability of A's fact is unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib

import torch
from safetensors.torch import load_file

from absorber_memory.engine import AbsorptionEngine
from absorber_memory.layout import session_key
from absorber_memory.metrics import answer_logprobs
from absorber_memory.persistence import ADAPTER_WEIGHTS
from absorber_memory.testing import tiny_model

from ..conftest import turn
from .test_sessions import QUESTION, check_invariants, reference_answer

SESSIONS = [f"s{k}" for k in range(8)]
TURNS = 20
FACT_QUESTION = [{"role": "user", "content": "What is my secret code word?"}]
FACT_ANSWER = "Your secret code word is Zanzibar."


def planted(i: int) -> list[dict]:
    """Session A's turns: a distinctive fact, repeated so absorption has it in several rounds."""
    return [{"role": "user", "content": f"Remember this, {i}: my secret code word is Zanzibar."},
            {"role": "assistant", "content": "Understood, your secret code word is Zanzibar."}]


def turns_of(session: str, i: int) -> list[dict]:
    return planted(i) if session == "s0" else turn(i, who=f"Person{session[1:]}")


def spy_on_adapters(memory) -> list[tuple[str, str | None, str | None, bool]]:
    """Record, at every use of the inference model, whose slot is active and who asked."""
    cache, seen = memory.adapters, []
    real_use = cache.use

    @contextlib.contextmanager
    def use(key, resolve):
        resolved = []  # what `use` itself resolved: a job may commit a newer version while the model is in use

        def recording():
            resolved.append(resolve())
            return resolved[-1]

        with real_use(key, recording) as model:
            slots = {k: slot for k, (slot, _) in cache._slots.items()}
            owners = [k for k, slot in slots.items() if slot == model.active_adapter]
            seen.append((key, slots.get(key), model.active_adapter, resolved[-1] is None, owners))
            yield model

    cache.use = use
    return seen


def fact_logprob(memory, session: str) -> float:
    """Log-probability of A's fact as the answer to its question, with `session`'s adapter."""
    prompt = memory.fmt.encode(memory.prefix(session), FACT_QUESTION, add_generation_prompt=True)
    answer = memory.fmt.encode_text(FACT_ANSWER)
    with memory.adapted_model(session) as model:
        logp = answer_logprobs(model, prompt, answer)
    return float(logp.gather(1, torch.tensor(answer)[:, None]).sum())


async def test_eight_sessions_never_see_each_others_adapters(make_service, tokenizer, tmp_path):
    memory = make_service(absorb_workers=2, max_loaded_adapters=3)  # LRU churn: slots are reused across sessions
    seen = spy_on_adapters(memory)
    added: dict[str, list[int]] = {s: [] for s in SESSIONS}

    async def talk(session: str) -> None:
        for i in range(TURNS):
            added[session] += await memory.aadd_messages(turns_of(session, i), session_id=session)
            if i % 3 == 2:
                assert await memory.agenerate(QUESTION, session_id=session)
            await asyncio.sleep(0)

    await asyncio.gather(*(talk(s) for s in SESSIONS))
    ended = await memory.aflush()
    assert ended and all(j.status == "done" for j in ended)
    for session, ids in added.items():
        check_invariants(memory, session, ids)
        assert len(memory.jobs(session)) >= 10  # absorption really ran in the background, often

    # 1. inference: each use had its own slot active, or adapters off before its first commit
    assert len(seen) >= len(SESSIONS) * (TURNS // 3)
    for key, own_slot, active, no_adapter, owners in seen:
        if not no_adapter:
            assert active == own_slot and owners == [key], (key, own_slot, active, owners)
    assert {key for key, *_ in seen} == {session_key(s) for s in SESSIONS}

    # 2. weights: B trained among seven others equals B trained alone
    alone = make_service(data_dir=tmp_path / "alone")
    b_alone = []
    for i in range(TURNS):
        b_alone += alone.add_messages(turns_of("s1", i), session_id="s1")
    alone.flush()
    shared, solo = load_file(memory.adapter_path("s1") / ADAPTER_WEIGHTS), load_file(alone.adapter_path("s1") / ADAPTER_WEIGHTS)
    assert shared.keys() == solo.keys() and all(torch.equal(shared[k], solo[k]) for k in shared)
    assert fact_logprob(memory, "s1") == fact_logprob(alone, "s1")  # A's fact did not move B
    base = fact_logprob(alone, "never-talked")
    assert fact_logprob(memory, "s0") != base  # ...while A's own adapter did change it

    # 3. answers: each session's generation equals a fresh model with only its own adapter
    for session in ["s3", "s0", "s7", "s1", "s0", "s5"]:
        expected = reference_answer(tokenizer, memory.adapter_path(session), QUESTION, memory.config)
        assert memory.generate(QUESTION, session_id=session) == expected


def lora_weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.model.state_dict().items() if ".lora_" in k}


def test_an_adapter_reset_draws_only_from_its_own_generator(tokenizer, monkeypatch):
    """Workers start adapters on several threads at once: others using the global RNG mid-reset change nothing."""
    engine = AbsorptionEngine(tiny_model(tokenizer), tokenizer=tokenizer, config={"seed": 3})
    state = torch.get_rng_state()
    engine.reset_adapter()
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is neither read nor reseeded
    alone = lora_weights(engine)
    assert all(bool(v.any()) == (".lora_A." in k) for k, v in alone.items())  # A drawn, B = 0

    real = torch.nn.init.kaiming_uniform_

    def beside_another_worker(tensor, *args, **kwargs):
        torch.manual_seed(tensor.shape[0])  # another thread's reset reseeds the global RNG ...
        torch.rand(7)  # ... and draws from it, between two of this reset's draws
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", beside_another_worker)
    for weight in engine.model.parameters():
        weight.data.add_(1.0)  # any trained state; the reset replaces the adapter's part
    engine.reset_adapter()
    again = lora_weights(engine)
    assert again.keys() == alone.keys() and all(torch.equal(again[k], alone[k]) for k in alone)

    other = AbsorptionEngine(tiny_model(tokenizer), tokenizer=tokenizer, config={"seed": 4})
    other.reset_adapter()
    assert any(not torch.equal(v, alone[k]) for k, v in lora_weights(other).items())  # the seed decides
