"""Old names keep working for one release, each with a `DeprecationWarning` that names the new one."""

from __future__ import annotations

import pytest

from ..conftest import turn


def test_flush_blocks_now_and_aflush_is_its_async_twin(make_service):
    memory = make_service()
    for k in range(3):
        memory.add_messages(turn(k), session_id="s")
    ended = memory.flush("s")
    assert ended and all(j.status == "done" for j in ended) and not memory.jobs("s", "queued")


async def test_awaiting_flush_still_works_with_a_warning(make_service):
    memory = make_service()
    memory.add_messages(turn(0) + turn(1) + turn(2), session_id="s")
    with pytest.warns(DeprecationWarning, match="aflush"):
        ended = await memory.flush("s")
    assert isinstance(ended, list) and memory.window_tokens("s") <= memory.config.window_tokens
    assert await memory.aflush("s") == []


@pytest.mark.parametrize(("old", "new"), [("flush_sync", "flush"), ("session_dir", "layout.session_dir"),
                                          ("adapter_dir", "layout.adapter_dir"), ("info", "job")])
def test_moved_methods_warn_and_delegate(make_service, old, new):
    memory = make_service()
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        method = getattr(memory, old)
    assert callable(method)


def test_langchain_history_points_to_its_new_home(make_service):
    with pytest.raises(AttributeError, match="langchain_absorber.session_history"):
        make_service().langchain_history("s")


def test_unknown_attributes_still_raise(make_service):
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        make_service().nope  # noqa: B018


def test_moved_module_names_warn():
    import absorber_memory.memory as memory_module
    import absorber_memory.store as store_module
    from absorber_memory.config import lora_config
    from absorber_memory.layout import session_key

    with pytest.warns(DeprecationWarning, match="absorber_memory.config.lora_config"):
        assert memory_module.lora_config is lora_config
    with pytest.warns(DeprecationWarning, match="absorber_memory.layout.session_key"):
        assert store_module.session_key is session_key
    with pytest.raises(AttributeError):
        store_module.not_a_name  # noqa: B018


def test_job_info_sync_ids_is_following_ids(make_service):
    memory = make_service()
    memory.add_messages(turn(0) + turn(1) + turn(2), session_id="s")
    memory.flush()
    job = memory.jobs("s")[0]
    with pytest.warns(DeprecationWarning, match="following_ids"):
        assert job.sync_ids == job.following_ids


def test_parametric_memory_old_engine_methods_warn(make_memory):
    pm = make_memory()
    with pytest.warns(DeprecationWarning, match="engine.run_round"):
        report = pm.absorb_turns([], turn(0), None, n_probes=1, base_teacher=True)
    assert report.steps >= 0
    with pytest.warns(DeprecationWarning, match="engine.reconfigure"):
        pm.reconfigure(max_steps=2)
    assert pm.config.max_steps == 2 and pm.absorption_log == []


def test_views_are_both_lists_and_calls(make_memory):
    pm = make_memory()
    pm.add_messages(turn(0))
    assert pm.window() == pm.window == turn(0)
    assert pm.transcript() == turn(0) and pm.prefix() == [] and pm.absorbed_messages() == []


def test_llamaindex_core_keyword_warns(make_service):
    pytest.importorskip("llama_index.core")
    from llama_index.memory.absorber import AbsorberLLM, AbsorberMemory

    core = make_service()
    with pytest.warns(DeprecationWarning, match="memory="):
        llm = AbsorberLLM(core=core)
    assert llm.memory is core and AbsorberMemory(memory=core).memory is core
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="once"):
        AbsorberLLM(make_service(data_dir=core.data_dir.parent / "other"), core=core)
