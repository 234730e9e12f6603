import pytest

from absorber_memory import AbsorberConfig, ConfigError


def test_defaults_are_valid_and_round_trip():
    cfg = AbsorberConfig()
    assert cfg.losses == {"l1": 1.0, "logit_kl": 0.25} and cfg.lora_rank == 16 and cfg.device == "auto"
    again = AbsorberConfig(**cfg.model_dump(mode="json"))
    assert again == cfg


def test_every_field_has_a_description():
    for name, field in AbsorberConfig.model_fields.items():
        assert field.description, name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sync_tokens": -1}, r"`sync_tokens` must be >= 0, got -1"),
        ({"window_tokens": 0}, r"`window_tokens` must be > 0, got 0"),
        ({"lr": 0}, r"`lr` must be > 0"),
        ({"max_steps": 0}, r"`max_steps` must be >= 1"),
        ({"lora_rank": "big"}, r"`lora_rank`"),
        ({"lora_dropout": 1.0}, r"`lora_dropout` must be < 1"),
        ({"num_threads": 0}, r"`num_threads` must be >= 1"),
        ({"dtype": "int8"}, r"`dtype`"),
        ({"losses": {"l3": 1.0}}, r"`losses` has unknown names \['l3'\]"),
        ({"losses": {"l1": 0.0}}, r"`losses` weights must be >= 0 with at least one > 0"),
        ({"losses": {"l1": -1.0, "mse": 1.0}}, r"`losses` weights"),
        ({"absorb_tokens": 600, "window_tokens": 512}, r"`absorb_tokens` must be <= `window_tokens`"),
        ({"probe_count": 0, "sync_tokens": 0}, r"`probe_count` and `sync_tokens` are both 0"),
        ({"probe_prompts": ["  "]}, r"`probe_prompts` must not contain empty prompts"),
        ({"update_penalty": "l1"}, r"`update_penalty_weight` must be > 0"),
        ({"sync_token": 5}, r"`sync_token` is not a known setting"),
        ({"lora_layers": []}, r"`lora_layers` list should have at least 1 item"),
        ({"lora_layers": [3, 3]}, r"`lora_layers` must not repeat a layer, got \[3, 3\]"),
        ({"lora_layers": ["top"]}, r"`lora_layers.0`"),
    ],
)
def test_bad_values_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AbsorberConfig(**kwargs)


def test_lm_only_needs_no_sync_text():
    cfg = AbsorberConfig(losses={"lm": 1.0}, probe_count=0, sync_tokens=0)
    assert cfg.sync_losses() == {}


def test_assignment_is_validated():
    cfg = AbsorberConfig()
    with pytest.raises(ConfigError, match="`max_steps` must be >= 1"):
        cfg.max_steps = 0
    assert cfg.max_steps == 30
