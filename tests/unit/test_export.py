"""`export_adapter` and the serving contract: a plain PEFT folder, a manifest, and what vLLM accepts.

The vLLM tests run where `vllm` can be imported (`make vllm-check` puts it on
the path without its dependencies); elsewhere they skip and the documented
constraints are checked by `serving_problems` alone.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from absorber_memory import InvalidSessionError, StorageError
from absorber_memory.export import MANIFEST, export_adapter, serving_problems
from absorber_memory.persistence import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from absorber_memory.testing import tiny_model

from ..conftest import turn

LLAMA_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture
def exported(make_service, tmp_path):
    memory = make_service()
    for i in range(4):
        memory.add_messages(turn(i), session_id="ana")
    memory.flush()
    folder = memory.export_adapter("ana", tmp_path / "export")
    return memory, folder


def test_export_writes_a_peft_folder_a_transcript_and_a_manifest(exported, tokenizer):
    memory, folder = exported
    manifest = json.loads((folder / MANIFEST).read_text())
    rows = memory.transcript("ana")
    absorbed = [m.id for m in rows if m.absorbed]
    assert absorbed and manifest["absorbed_message_ids"] == absorbed
    assert manifest["window_message_ids"] == [m.id for m in rows if not m.absorbed]
    assert manifest["adapter_version"] == int(memory.adapter_path("ana").name[1:])
    assert manifest["rank"] == memory.config.lora_rank and manifest["serving_problems"] == []
    assert {name.split(".")[-1] for name in manifest["target_modules"]} <= LLAMA_LINEAR
    lines = [json.loads(x) for x in (folder / "transcript.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == [m.id for m in rows]
    assert [x["absorbed"] for x in lines] == [m.absorbed for m in rows]
    # the folder is what the memory serves, and PEFT loads it as it is
    saved = load_file(folder / ADAPTER_WEIGHTS)
    assert saved.keys() == load_file(memory.adapter_path("ana") / ADAPTER_WEIGHTS).keys()
    peft_model = PeftModel.from_pretrained(tiny_model(tokenizer, seed=0), folder)
    state = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    loaded = {k.replace(".default", ""): v for k, v in state.items()}
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_export_refuses_bad_targets_and_changes_nothing(exported, tmp_path, make_service):
    memory, folder = exported
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(StorageError, match="not an empty directory"):
        memory.export_adapter("ana", folder)
    assert sorted(p.name for p in folder.iterdir()) == before
    a_file = tmp_path / "file"
    a_file.write_text("keep")
    with pytest.raises(StorageError, match="not an empty directory"):
        memory.export_adapter("ana", a_file)
    assert a_file.read_text() == "keep"
    with pytest.raises(InvalidSessionError, match="unknown session 'nobody'"):
        export_adapter(memory, "nobody", tmp_path / "x")
    memory.add_messages([{"role": "user", "content": "hi"}], session_id="fresh")
    with pytest.raises(StorageError, match="has no adapter yet"):
        memory.export_adapter("fresh", tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert not list(tmp_path.glob(".*tmp-*"))  # no half-written folder left behind


def test_export_for_a_vllm_resolver_names_the_served_model_and_can_leave_the_transcript_out(make_service, tmp_path):
    memory = make_service()
    for i in range(4):
        memory.add_messages(turn(i), session_id="ana")
    memory.flush()
    folder = memory.export_adapter("ana", tmp_path / "loras" / "ana", base_model_name="org/served-base",
                                   transcript=False)  # fmt: skip
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == "org/served-base" and config["peft_type"] == "LORA"
    assert json.loads((folder / MANIFEST).read_text())["base_model"] == "org/served-base"
    assert not (folder / "transcript.jsonl").exists()
    for bad in ("", "  ", 3):
        with pytest.raises(StorageError, match="base_model_name"):
            memory.export_adapter("ana", tmp_path / "bad", base_model_name=bad)
    assert not (tmp_path / "bad").exists()


def adapter_config(folder):
    return json.loads((folder / ADAPTER_CONFIG).read_text())


BAD_CONFIGS = [
    ({"r": 32}, "greater than max_lora_rank 16"),
    ({"bias": "all"}, "bias"),
    ({"lora_bias": True}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"use_dora": True}, "DoRA"),
    ({"init_lora_weights": "pissa"}, "changes the base weights"),
]


@pytest.mark.parametrize(("change", "problem"), BAD_CONFIGS)
def test_serving_problems_name_what_vllm_refuses(exported, change, problem):
    config = adapter_config(exported[1])
    assert serving_problems(config, max_lora_rank=16) == []
    found = serving_problems({**config, **change}, max_lora_rank=16)
    assert len(found) == 1 and problem in found[0]


def test_a_rank_above_the_servers_limit_is_named(exported):
    config = adapter_config(exported[1])
    assert serving_problems(config, max_lora_rank=config["r"]) == []
    assert "greater than max_lora_rank" in serving_problems(config, max_lora_rank=config["r"] - 1)[0]


# --- vLLM's own checks, where vLLM can be imported ------------------------------------------------
@pytest.fixture
def vllm_lora(monkeypatch):
    lora_model = pytest.importorskip("vllm.lora.lora_model", reason="vLLM is not importable here (`make vllm-check`)")
    # A CPU-only machine has no vLLM platform, so vLLM would pin host memory for a GPU that is not there.
    monkeypatch.setattr(lora_model, "PIN_MEMORY", False)
    from vllm.config.lora import LoRAConfig
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    return LoRAConfig, LoRAModel, PEFTHelper


def test_vllm_loads_the_exported_adapter(exported, vllm_lora):
    LoRAConfig, LoRAModel, PEFTHelper = vllm_lora
    _, folder = exported
    path = str(folder)
    helper = PEFTHelper.from_local_dir(path, max_position_embeddings=2048)
    helper.validate_legal(LoRAConfig(max_lora_rank=16, max_loras=4))
    lora = LoRAModel.from_local_checkpoint(path, LLAMA_LINEAR, peft_helper=helper, device="cpu", dtype=torch.float32)
    saved = load_file(folder / ADAPTER_WEIGHTS)
    assert len(lora.loras) == len(saved) // 2  # one (A, B) pair per adapted module
    for name, weights in lora.loras.items():
        assert weights.rank == helper.r and name.split(".")[-1] in LLAMA_LINEAR
    with pytest.raises(ValueError, match="max_lora_rank"):
        helper.validate_legal(LoRAConfig(max_lora_rank=8, max_loras=4))


@pytest.mark.parametrize(("change", "problem"), BAD_CONFIGS)
def test_vllm_refuses_exactly_what_serving_problems_names(exported, vllm_lora, change, problem):
    LoRAConfig, _, PEFTHelper = vllm_lora
    config = {**adapter_config(exported[1]), **change}
    with pytest.raises(ValueError):
        PEFTHelper.from_dict(config).validate_legal(LoRAConfig(max_lora_rank=16, max_loras=4))
    assert serving_problems(config, max_lora_rank=16)


def test_vllms_filesystem_resolver_finds_an_exported_session(make_service, tmp_path, vllm_lora):
    import asyncio

    from vllm.plugins.lora_resolvers.filesystem_resolver import FilesystemResolver

    memory = make_service()
    for i in range(4):
        memory.add_messages(turn(i), session_id="ana")
    memory.flush()
    memory.export_adapter("ana", tmp_path / "loras" / "ana-memory", base_model_name="org/served-base")
    resolver = FilesystemResolver(str(tmp_path / "loras"))
    request = asyncio.run(resolver.resolve_lora("org/served-base", "ana-memory"))
    assert request is not None and request.lora_path == str(tmp_path / "loras" / "ana-memory")
    assert asyncio.run(resolver.resolve_lora("another/base", "ana-memory")) is None
