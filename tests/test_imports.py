import absorber_memory

EXPECTED_ALL = [
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
    "StorageError",
    "StoredMessage",
    "TemplateError",
    "__version__",
    "fidelity",
    "load_model",
    "run_job",
]


def test_all_is_pinned_and_sorted():
    assert absorber_memory.__all__ == EXPECTED_ALL
    assert sorted(absorber_memory.__all__, key=str.lower) == sorted(EXPECTED_ALL, key=str.lower)
    for name in EXPECTED_ALL:
        assert hasattr(absorber_memory, name), name


def test_version_comes_from_metadata():
    from importlib.metadata import version

    assert absorber_memory.__version__ == version("absorber-memory")


def test_errors_are_value_errors_where_input_is_bad():
    assert issubclass(absorber_memory.ConfigError, ValueError)
    assert issubclass(absorber_memory.InvalidMessageError, ValueError)
    assert issubclass(absorber_memory.StorageError, absorber_memory.AbsorberError)
