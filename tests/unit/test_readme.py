"""The README's Python snippets run as written (on the tiny model), and really absorb something."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import absorber_memory
from absorber_memory import AbsorberMemory, ParametricMemory

from ..conftest import FAST

README = Path(__file__).resolve().parents[2] / "README.md"


def snippets(first_import: str) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return [b for b in blocks if b.startswith(first_import)]


@pytest.fixture
def tiny_classes(monkeypatch, tokenizer, tmp_path):
    """`AbsorberMemory` / `ParametricMemory` as the snippets name them, on the tiny model and a temp data dir."""
    from absorber_memory.testing import tiny_model

    fast = dict(FAST, max_steps=4)

    class TinyAbsorberMemory(AbsorberMemory):
        def __init__(self, model=None, *, config=None, **kwargs):
            super().__init__(tiny_model(tokenizer), tokenizer=tokenizer, config={**fast, **dict(config or {})},
                             data_dir=tmp_path / "home", **kwargs)

    class TinyParametricMemory(ParametricMemory):
        def __init__(self, model=None, *, config=None, **kwargs):
            overrides = config.model_dump() if config is not None else {}
            kwargs.pop("tokenizer", None)
            super().__init__(model if model is not None else tiny_model(tokenizer), tokenizer=tokenizer,
                             config={**overrides, **fast}, **kwargs)

        @classmethod
        def load(cls, path, model=None, *, tokenizer=None):
            return ParametricMemory.load(path, tiny_model(tokenizer_), tokenizer=tokenizer_)

    tokenizer_ = tokenizer
    monkeypatch.setattr(absorber_memory, "AbsorberMemory", TinyAbsorberMemory)
    monkeypatch.setattr(absorber_memory, "ParametricMemory", TinyParametricMemory)
    monkeypatch.chdir(tmp_path)
    return TinyAbsorberMemory, TinyParametricMemory


def test_the_absorber_memory_snippet_absorbs_then_answers_and_forgets(tiny_classes, capsys):
    (code,) = [s for s in snippets("from absorber_memory import AbsorberMemory\n")]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["absorbed"], "the snippet's turns must overflow the window and be absorbed"
    assert len(scope["absorbed"]) < len(scope["ids"])  # the latest turns stay in the window
    assert f"{len(scope['absorbed'])} of 8 messages absorbed" in capsys.readouterr().out
    assert scope["memory"].transcript("marta") == []  # forget_user ran
    scope["memory"].close()


def test_the_parametric_memory_snippet_absorbs_measures_and_reloads(tiny_classes):
    (code,) = snippets("from absorber_memory import AbsorberConfig, ParametricMemory, fidelity\n")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    pm = scope["pm"]
    assert len(pm.absorbed_messages) >= 2  # the window overflowed, then the explicit absorb
    assert 0 <= scope["report"].final_loss < scope["report"].initial_loss
    assert (Path("marta-memory") / "adapter").is_dir()


@pytest.mark.parametrize("first_import", ["from langchain.agents import create_agent\n", "import absorber_memory\n"])
def test_the_integration_snippets_absorb_then_answer(tiny_classes, first_import, capsys):
    (code,) = snippets(first_import)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    core = scope.get("core") or scope["memory"]
    assert scope["absorbed"], "the snippet's turns must overflow the window and be absorbed"
    assert f"{len(scope['absorbed'])} messages absorbed; answer:" in capsys.readouterr().out
    core.close()
