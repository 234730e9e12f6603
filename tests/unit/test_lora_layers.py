"""`lora_layers`: an adapter on some decoder layers only (upper ones make each step cheaper)."""

from __future__ import annotations

import json

import pytest
import torch

from absorber_memory import AbsorberConfig, ConfigError, ParametricMemory, StorageError
from absorber_memory.config import lora_config, resolve_layers
from absorber_memory.export import serving_problems
from absorber_memory.testing import tiny_model

from ..conftest import FAST, chat, turn

CHAT = chat("My name is Ana and I live in Lisbon.", "Nice to meet you, Ana!", "I keep two cats.", "Lovely.")


def lora_layer_indices(model) -> set[int]:
    """The decoder layers holding trainable LoRA weights."""
    return {
        int(name.split(".layers.")[1].split(".")[0])
        for name, p in model.named_parameters()
        if p.requires_grad and "lora_" in name
    }


def hidden_states(memory, messages):
    ids = torch.tensor([memory.fmt.encode([], messages)])
    with torch.no_grad():
        return memory.model(input_ids=ids, output_hidden_states=True).hidden_states


def test_negative_indices_count_from_the_top():
    assert resolve_layers([-1, 0, -2], 4) == [0, 2, 3]
    with pytest.raises(ConfigError, match=r"`lora_layers` has indices \[4, -5\] outside this model's 4 layers"):
        resolve_layers([4, -5, 1], 4)
    with pytest.raises(ConfigError, match="names a layer twice"):
        resolve_layers([1, -3], 4)


def test_resolving_layers_needs_the_model():
    with pytest.raises(ConfigError, match="`lora_layers` needs the base model"):
        lora_config(AbsorberConfig(lora_layers=[-1]))
    assert lora_config(AbsorberConfig()).layers_to_transform is None  # every layer: no model needed


def test_only_the_named_layers_are_adapted_and_trained(make_memory, tokenizer):
    memory = make_memory(lora_layers=[-1])  # the tiny model has 2 layers
    assert lora_layer_indices(memory.model) == {1}
    assert set(memory.model.peft_config["default"].target_modules) >= {"q_proj", "down_proj"}
    report = memory.absorb(CHAT[:2], sync=[CHAT[2:]])
    assert report.final_loss < report.initial_loss
    probe = chat("What do you know about me?")
    adapted = hidden_states(memory, probe)
    with memory.adapter_disabled():
        base = hidden_states(memory, probe)
    # below the adapted layer the states are the base model's; from it on the adapter moved them
    assert torch.equal(adapted[0], base[0]) and torch.equal(adapted[1], base[1])
    assert not torch.allclose(adapted[2], base[2])


def test_named_targets_combine_with_layers(make_memory):
    memory = make_memory(lora_layers=[0], lora_targets=["q_proj", "v_proj"])
    names = {n.split(".layers.")[1] for n, p in memory.model.named_parameters() if p.requires_grad}
    assert {n.split(".")[2] for n in names} == {"q_proj", "v_proj"} and lora_layer_indices(memory.model) == {0}


def test_layers_outside_the_model_fail_clearly(tokenizer):
    with pytest.raises(ConfigError, match=r"`lora_layers` has indices \[2\] outside this model's 2 layers"):
        ParametricMemory(tiny_model(tokenizer), tokenizer=tokenizer, config=AbsorberConfig(**FAST, lora_layers=[2]))


def test_an_adapter_made_for_other_layers_is_refused_and_nothing_changes(make_memory, tmp_path):
    every = make_memory()
    every.absorb(CHAT[:2], sync=[CHAT[2:]])
    every.save_adapter(tmp_path / "every")
    top = make_memory(lora_layers=[-1])
    top.absorb(CHAT[:2], sync=[CHAT[2:]])
    before = {k: v.clone() for k, v in top.model.state_dict().items() if "lora_" in k}
    with pytest.raises(StorageError, match="does not fit this model's adapter"):
        top.load_adapter(tmp_path / "every")
    after = {k: v for k, v in top.model.state_dict().items() if "lora_" in k}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_save_and_load_keep_the_layers(make_memory, tokenizer, tmp_path):
    memory = make_memory(lora_layers=[-1])
    memory.absorb(CHAT[:2], sync=[CHAT[2:]])
    memory.save(tmp_path / "mem")
    again = ParametricMemory.load(tmp_path / "mem", tiny_model(tokenizer), tokenizer=tokenizer)
    assert again.config.lora_layers == [-1] and lora_layer_indices(again.model) == {1}
    probe = chat("Where do I live?")
    assert torch.equal(hidden_states(again, probe)[-1], hidden_states(memory, probe)[-1])


def test_sessions_absorb_serve_and_export_with_upper_layers(make_service, tmp_path):
    memory = make_service(lora_layers=[-1])
    for k in range(4):
        memory.add_messages(turn(k), session_id="s")
    memory.flush()
    folder = memory.adapter_path("s")
    assert folder is not None
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["layers_to_transform"] == [1] and serving_problems(saved) == []
    answer = memory.generate(chat("Where do I live?"), session_id="s")
    memory.close()
    again = make_service(lora_layers=[-1])
    assert again.generate(chat("Where do I live?"), session_id="s") == answer


def test_reopening_with_layers_outside_the_model_keeps_the_data(make_service, tmp_path):
    memory = make_service()
    ids = memory.add_messages(turn(0), session_id="s")
    memory.close()
    with pytest.raises(ConfigError, match="`lora_layers` has indices"):
        make_service(lora_layers=[7])
    assert [m.id for m in make_service().transcript("s")] == ids
