import absorber_memory

EXPECTED_ALL = [
    "DEFAULT_MODEL",
    "DEFAULT_SESSION",
    "AbsorberConfig",
    "AbsorberError",
    "AbsorberMemory",
    "AbsorptionEngine",
    "AbsorptionError",
    "AbsorptionQueue",
    "AbsorptionReport",
    "ConfigError",
    "Executor",
    "FidelityReport",
    "InvalidMessageError",
    "InvalidSessionError",
    "JobCancelled",
    "JobHandle",
    "JobInfo",
    "JobResult",
    "JobSpec",
    "JobStatus",
    "LocalExecutor",
    "LONG_SESSION_RECIPE",
    "ModelLoadError",
    "ParametricMemory",
    "RECALL_QUESTIONS",
    "RayExecutor",
    "Recalled",
    "SkippedContentWarning",
    "StorageError",
    "StoredMessage",
    "TemplateError",
    "TextStream",
    "__version__",
    "check_id",
    "fidelity",
    "load_model",
    "memory_from_spec",
    "memory_spec",
    "resolve_memory",
    "run_job",
    "session_fidelity",
    "shared_memory",
]

#: The public API of 0.1.0: every name must still import from the package.
RELEASED_ALL = [
    "DEFAULT_MODEL",
    "AbsorberConfig",
    "AbsorberError",
    "AbsorberMemory",
    "AbsorptionError",
    "AbsorptionQueue",
    "AbsorptionReport",
    "ConfigError",
    "Executor",
    "FidelityReport",
    "InvalidMessageError",
    "InvalidSessionError",
    "JobCancelled",
    "JobHandle",
    "JobInfo",
    "JobResult",
    "JobSpec",
    "LocalExecutor",
    "ModelLoadError",
    "ParametricMemory",
    "SkippedContentWarning",
    "StorageError",
    "StoredMessage",
    "TemplateError",
    "TextStream",
    "__version__",
    "fidelity",
    "load_model",
    "run_job",
    "session_fidelity",
    "shared_memory",
]

LANGCHAIN_ALL = [
    "AbsorberChatMessageHistory",
    "AbsorberLLM",
    "AbsorptionMiddleware",
    "ChatAbsorber",
    "__version__",
    "parse_tool_calls",
    "session_history",
    "to_chat",
    "to_chat_messages",
]


def test_all_is_pinned_and_sorted():
    assert absorber_memory.__all__ == EXPECTED_ALL
    assert sorted(absorber_memory.__all__, key=str.lower) == sorted(EXPECTED_ALL, key=str.lower)
    for name in EXPECTED_ALL:
        assert hasattr(absorber_memory, name), name
    assert set(RELEASED_ALL) <= set(absorber_memory.__all__)


def test_version_comes_from_metadata():
    from importlib.metadata import version

    assert absorber_memory.__version__ == version("absorber-memory")


def test_errors_are_value_errors_where_input_is_bad():
    assert issubclass(absorber_memory.ConfigError, ValueError)
    assert issubclass(absorber_memory.InvalidMessageError, ValueError)
    assert issubclass(absorber_memory.StorageError, absorber_memory.AbsorberError)


def test_langchain_all_is_pinned_and_nothing_heavy_happens_at_import():
    import absorber_memory.shared as shared
    import langchain_absorber

    assert langchain_absorber.__all__ == LANGCHAIN_ALL
    for name in LANGCHAIN_ALL:
        assert hasattr(langchain_absorber, name), name
    chat = langchain_absorber.ChatAbsorber()  # no memory given: the shared core, built on first use only
    assert chat.memory is None and shared._memory is None


LLAMAINDEX_ALL = [
    "AbsorberLLM",
    "AbsorberMemory",
    "AbsorptionMemoryBlock",
    "__version__",
    "from_chat",
    "to_chat",
    "to_chat_messages",
]


def test_llamaindex_all_is_pinned_and_nothing_heavy_happens_at_construction():
    import absorber_memory.shared as shared
    import llama_index.memory.absorber as li

    assert li.__all__ == LLAMAINDEX_ALL
    for name in LLAMAINDEX_ALL:
        assert hasattr(li, name), name
    memory, llm, block = li.AbsorberMemory(), li.AbsorberLLM(), li.AbsorptionMemoryBlock()
    assert llm.metadata.is_chat_model and memory.to_dict()["core_spec"] is None and block.name
    assert shared._memory is None  # the shared core is built on first use, not at construction
