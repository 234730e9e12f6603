"""Shared fixtures: a tiny in-process Llama (no downloads) and a data dir per test."""

from __future__ import annotations

import pytest
import torch

from absorber_memory import AbsorberConfig, ParametricMemory
from absorber_memory.config import PLAIN_RECIPE
from absorber_memory.models import absorber_home as _absorber_home
from absorber_memory.testing import tiny_model, tiny_tokenizer

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

#: The real data directory, read before tests redirect ABSORBER_HOME, so slow
#: tests convert the default model's GGUF once per machine, not once per test.
REAL_MODEL_CACHE = _absorber_home() / "models"


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model(tokenizer):
    """A fresh tiny model per test (ParametricMemory injects LoRA layers into it)."""
    return tiny_model(tokenizer, seed=0)


@pytest.fixture(autouse=True)
def absorber_home(tmp_path, monkeypatch):
    """Keep every test's data out of the real home directory."""
    home = tmp_path / "absorber-home"
    monkeypatch.setenv("ABSORBER_HOME", str(home))
    return home


#: Small, fast training for mechanism tests. They pin the paper's plain path (L1 only, probe answers as the only
#: sync text, no consolidation): the library's defaults add recitation, a logit-KL term and a consolidation after
#: every burst of rounds, which have their own tests (`test_recitation`, `test_consolidation`, `test_defaults`).
FAST = dict(
    max_steps=8,
    lr=1e-2,
    probe_count=2,
    probe_max_new_tokens=8,
    max_new_tokens=8,
    num_threads=1,
    **PLAIN_RECIPE,
)


@pytest.fixture
def make_memory(tokenizer):
    """Build a ParametricMemory on a fresh tiny model; keyword args override the fast config."""

    def make(seed: int = 0, **overrides):
        config = AbsorberConfig(**{**FAST, **overrides})
        return ParametricMemory(tiny_model(tokenizer, seed=seed), tokenizer=tokenizer, config=config)

    return make


def chat(*turns: str) -> list[dict]:
    """Alternating user/assistant messages from plain strings."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


#: Small windows so a few short turns overflow and queue absorption jobs.
SERVICE = dict(FAST, max_steps=4, window_tokens=60, absorb_tokens=30, sync_tokens=30)


@pytest.fixture
def make_service(tokenizer, tmp_path):
    """Build AbsorberMemory on a fresh tiny model in `tmp_path/data`; closed after the test."""
    from absorber_memory import AbsorberMemory

    opened = []

    def make(data_dir=None, wrap=None, seed: int = 0, **overrides):
        """`wrap(local_executor)` may return an executor around the default one (to slow or break jobs)."""
        from absorber_memory import LocalExecutor

        config = AbsorberConfig(**{**SERVICE, **overrides})
        model = tiny_model(tokenizer, seed=seed)
        executor = None if wrap is None else wrap(LocalExecutor(model, tokenizer, config, config.absorb_workers))
        memory = AbsorberMemory(model, tokenizer=tokenizer, config=config,
                                data_dir=data_dir or tmp_path / "data", executor=executor)
        opened.append(memory)
        return memory

    yield make
    for memory in opened:
        memory.close()


def turn(i: int, who: str = "Ana") -> list[dict]:
    """One user/assistant exchange with a distinctive fact."""
    return [
        {"role": "user", "content": f"My name is {who} and I was born in {1980 + i}. I live in Lisbon."},
        {"role": "assistant", "content": f"Hello {who}! Tell me more about yourself, number {i}."},
    ]
