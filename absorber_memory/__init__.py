"""absorber-memory: long-term memory for LLM agents, absorbed into LoRA weights.

Implements Absorber LLM (arXiv 2604.20915): old conversation leaves the
prompt and is written into a LoRA adapter by matching the hidden states of
the adapted, contextless model to those of the frozen model that still reads
it. `AbsorberMemory` serves many sessions with background absorption;
`ParametricMemory` is one conversation, absorbed in the foreground.
"""

from importlib.metadata import PackageNotFoundError, version

from .absorber import AbsorptionReport
from .config import LONG_SESSION_RECIPE, AbsorberConfig
from .engine import AbsorptionEngine
from .errors import (
    AbsorberError,
    AbsorptionError,
    ConfigError,
    InvalidMessageError,
    InvalidSessionError,
    JobCancelled,
    ModelLoadError,
    SkippedContentWarning,
    StorageError,
    TemplateError,
)
from .executor import LocalExecutor, run_job
from .generation import TextStream
from .jobs import Executor, JobInfo, JobResult, JobSpec, JobStatus
from .memory import ParametricMemory
from .metrics import FidelityReport, fidelity, session_fidelity
from .models import DEFAULT_MODEL, load_model
from .queue import AbsorptionQueue, JobHandle
from .ray_executor import RayExecutor
from .recall import RECALL_QUESTIONS, Recalled
from .sessions import DEFAULT_SESSION, AbsorberMemory
from .shared import memory_from_spec, memory_spec, resolve_memory, shared_memory
from .store import StoredMessage, check_id

try:
    __version__ = version("absorber-memory")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = [
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
