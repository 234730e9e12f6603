"""Slow: AbsorberMemory on the real default model (tied embeddings, 30 layers)."""

import pytest
import torch

from absorber_memory import AbsorberMemory
from absorber_memory.demo import PERSONA_CHAT, SYSTEM_PROMPT
from absorber_memory.models import DEFAULT_MODEL, load_model, replica

from ..conftest import REAL_MODEL_CACHE

pytestmark = pytest.mark.slow


def test_background_absorption_on_the_default_model(absorber_home):
    absorber_home.mkdir(parents=True)
    (absorber_home / "models").symlink_to(REAL_MODEL_CACHE)  # reuse this machine's converted weights
    model, tokenizer = load_model(DEFAULT_MODEL, device="cpu", cache_dir=REAL_MODEL_CACHE)
    twin = replica(model)
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(model.parameters(), twin.parameters()))
    assert twin.lm_head.weight is twin.model.embed_tokens.weight  # ties survive the rebuild
    ids = torch.tensor([tokenizer("Hello, my name is Marta.")["input_ids"]])
    assert torch.equal(model(ids).logits, twin(ids).logits)
    del twin, model

    config = dict(window_tokens=160, absorb_tokens=96, sync_tokens=64, max_steps=6, probe_count=2,
                  probe_max_new_tokens=12, max_new_tokens=12)
    with AbsorberMemory(config=config) as memory:  # no model, no data_dir: the documented defaults
        memory.add_messages([{"role": "system", "content": SYSTEM_PROMPT}], session_id="p")
        for message in PERSONA_CHAT:
            memory.add_messages([message], session_id="p")
        ended = memory.flush()
        assert ended and all(j.status == "done" for j in ended)
        assert all(j.metrics["final_loss"] < j.metrics["initial_loss"] for j in ended)
        assert memory.window_tokens("p") <= 160
        assert memory.context_messages("p")[0]["content"] == SYSTEM_PROMPT
        assert memory.generate([{"role": "user", "content": "Where do I live?"}], session_id="p")
        assert memory.data_dir == absorber_home and (absorber_home / "absorber.db").is_file()
