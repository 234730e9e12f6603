"""absorber-memory: long-term memory for LLM agents, absorbed into LoRA weights.

Implements Absorber LLM (arXiv 2604.20915): old conversation leaves the
prompt and is written into a LoRA adapter by matching the hidden states of
the adapted, contextless model to those of the frozen model that still reads
it. See `ParametricMemory` for one conversation.
"""

from importlib.metadata import PackageNotFoundError, version

from .absorber import AbsorptionReport
from .config import AbsorberConfig
from .errors import (
    AbsorberError,
    AbsorptionError,
    ConfigError,
    InvalidMessageError,
    ModelLoadError,
    StorageError,
    TemplateError,
)
from .memory import ParametricMemory
from .metrics import FidelityReport, fidelity
from .models import DEFAULT_MODEL, load_model

try:
    __version__ = version("absorber-memory")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = [
    "DEFAULT_MODEL",
    "AbsorberConfig",
    "AbsorberError",
    "AbsorptionError",
    "AbsorptionReport",
    "ConfigError",
    "FidelityReport",
    "InvalidMessageError",
    "ModelLoadError",
    "ParametricMemory",
    "StorageError",
    "TemplateError",
    "__version__",
    "fidelity",
    "load_model",
]
