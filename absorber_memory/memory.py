"""`ParametricMemory`: one conversation's memory in one LoRA adapter.

The facade users touch: it loads (or wraps) a base model, adds one LoRA
adapter, keeps the transcript, and runs Algorithm 2 over it: messages go
into a window; when the window overflows, the oldest turns are absorbed
(Algorithm 1, `absorber.py`) with the following turns plus self-generated
probes as sync text, and leave the prompt. One adapter keeps growing; there
is no per-chunk adapter and no merging. `context_messages()` is what to send
to the model; `generate()` answers with the adapter active.

`save()`/`load()` persist the adapter in PEFT format beside the transcript
and absorption log (JSON), written atomically.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .absorber import Absorber, AbsorptionReport
from .chat import ChatFormat, Message, check_lengths, split_prefix, validate_messages
from .config import AbsorberConfig
from .errors import ConfigError, InvalidMessageError, StorageError
from .generation import generate_batch_ids, generate_text
from .models import DEFAULT_MODEL, identity_mismatch, load_model, model_identity, set_threads
from .persistence import atomic_write_dir, load_adapter_weights, read_json, recover_dir, save_adapter, write_json
from .probes import chained_probe_segment, pick_probes, probe_segments
from .stream import plan_absorption

log = logging.getLogger(__name__)

ADAPTER = "default"
FORMAT_VERSION = 1
STATE_FILE = "memory.json"
ADAPTER_DIR = "adapter"


def lora_config(config: AbsorberConfig) -> Any:
    """The PEFT `LoraConfig` for a memory's settings."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def base_model(model: str | Any, tokenizer: Any | None, config: AbsorberConfig) -> tuple[Any, Any]:
    """`(base model, tokenizer)` from a name/path (loaded per `config`) or a loaded model and its tokenizer."""
    from peft import PeftModel

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
        if any(hasattr(m, "lora_A") for m in model.modules()):
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
        raise ConfigError(f"`max_new_tokens` must be < the model's context ({context} tokens), "
                          f"got {config.max_new_tokens}")
    for field in ("window_tokens", "context_tokens"):
        value = getattr(config, field)
        if value is not None and value + config.max_new_tokens > context:
            raise ConfigError(f"`{field}` + `max_new_tokens` must be <= the model's context ({context} tokens), "
                              f"got {value} + {config.max_new_tokens}")
    return config.context_tokens or context - config.max_new_tokens


def as_config(config: AbsorberConfig | dict[str, Any] | None) -> AbsorberConfig:
    """An `AbsorberConfig` from None (defaults), a config, or a dict of fields."""
    if config is None:
        return AbsorberConfig()
    if isinstance(config, AbsorberConfig):
        return config
    if isinstance(config, dict):
        return AbsorberConfig(**config)
    raise ConfigError(f"`config` must be an AbsorberConfig or a dict, got {type(config).__name__}")


class ParametricMemory:
    """A conversation memory that absorbs old turns into a LoRA adapter.

    Args:
        model: "smollm2-135m-instruct" (default, embedded), a Hugging Face id,
            a local path, or a loaded `PreTrainedModel` (LoRA layers are
            injected into it in place).
        tokenizer: required when `model` is a loaded model.
        config: an `AbsorberConfig` or a dict of its fields.
    """

    def __init__(
        self,
        model: str | Any = DEFAULT_MODEL,
        *,
        tokenizer: Any | None = None,
        config: AbsorberConfig | dict[str, Any] | None = None,
    ) -> None:
        from peft import get_peft_model

        self.config = as_config(config)
        base, tokenizer = base_model(model, tokenizer, self.config)
        self._limit = prompt_limit(self.config, base)
        self.base_identity = model_identity(base)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self._model = get_peft_model(base, lora_config(self.config), adapter_name=ADAPTER)
        self._model.eval()
        self._tokenizer = tokenizer
        self.fmt = ChatFormat(tokenizer)
        self._absorber = Absorber(self._model, self.fmt, self.config)
        self._prefix: list[Message] = []
        self._transcript: list[Message] = []
        self._absorbed = 0
        self._log: list[dict[str, Any]] = []

    # --- views -------------------------------------------------------------------
    @property
    def model(self) -> Any:
        """The PEFT model (base + this memory's adapter)."""
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def prefix(self) -> list[Message]:
        """The system message(s): always in the prompt, never absorbed."""
        return [dict(m) for m in self._prefix]

    @property
    def transcript(self) -> list[Message]:
        """Every non-system message added so far, absorbed or not, oldest first."""
        return [dict(m) for m in self._transcript]

    @property
    def window(self) -> list[Message]:
        """The messages not yet absorbed (they stay in the prompt)."""
        return [dict(m) for m in self._transcript[self._absorbed :]]

    @property
    def absorbed_messages(self) -> list[Message]:
        """The messages now held by the adapter instead of the prompt."""
        return [dict(m) for m in self._transcript[: self._absorbed]]

    @property
    def absorption_log(self) -> list[dict[str, Any]]:
        """One entry per absorption: which messages (if from the transcript) and its report."""
        return [dict(e) for e in self._log]

    def window_tokens(self) -> int:
        """Tokens the window takes in the prompt now."""
        return sum(self.fmt.count(m) for m in self._transcript[self._absorbed :])

    def context_messages(self) -> list[Message]:
        """What to send to the model now: the prefix and the window."""
        return self.prefix + self.window

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Within this block the model is the frozen base model."""
        with self._model.disable_adapter():
            yield

    # --- Algorithm 2: adding messages ---------------------------------------------
    def add_message(self, role: str, content: str) -> list[AbsorptionReport]:
        """Add one message; see `add_messages`."""
        return self.add_messages([{"role": role, "content": content}])

    def add_messages(self, messages: list[dict[str, Any]]) -> list[AbsorptionReport]:
        """Append messages to the transcript and, with `auto_absorb`, absorb any overflow.

        System messages are accepted only before the conversation starts (they
        become the prefix). Returns the reports of absorptions this triggered.
        """
        clean = validate_messages(messages)
        check_lengths(self.fmt, clean, self._limit)
        prefix, rest = split_prefix(clean)
        if prefix and self._transcript:
            raise InvalidMessageError("system messages must come before the conversation starts")
        self._prefix += prefix
        self._transcript += rest
        return self.absorb_overflow() if self.config.auto_absorb else []

    def absorb_overflow(self) -> list[AbsorptionReport]:
        """Absorb the oldest turns until the window fits `window_tokens` (Algorithm 2)."""
        reports = []
        cfg = self.config
        while True:
            window = self._transcript[self._absorbed :]
            plan = plan_absorption(
                [self.fmt.count(m) for m in window],
                [m["role"] for m in window],
                window_tokens=cfg.window_tokens,
                absorb_tokens=cfg.absorb_tokens,
                sync_tokens=cfg.sync_tokens,
            )
            if plan is None:
                break
            context = window[: plan.absorb]
            following = window[plan.absorb : plan.absorb + plan.sync]
            report = self._absorb(self._prefix, context, [], cfg.probe_count, lead=following)
            self._log.append({"first": self._absorbed, "count": plan.absorb, "report": report.to_dict()})
            self._absorbed += plan.absorb
            reports.append(report)
        if self.window_tokens() > cfg.window_tokens:
            log.warning("the newest turn alone exceeds `window_tokens` (%d); it stays in the prompt", cfg.window_tokens)
        return reports

    # --- Algorithm 1 ----------------------------------------------------------------
    def absorb(self, context: list[dict[str, Any]], sync: list[list[dict[str, Any]]] | None = None) -> AbsorptionReport:
        """Absorb `context` into the adapter (Algorithm 1); the transcript is not changed.

        Args:
            context: chat messages C; leading system messages, if any, are the
                prefix for this call (else the memory's prefix is used).
            sync: sync segments S (each a list of messages); None generates
                `probe_count` probes answered by the teacher.
        """
        prefix, context_rest = split_prefix(validate_messages(context, name="context"), name="context")
        check_lengths(self.fmt, context_rest, self._limit, name="context")
        if not context_rest:
            raise InvalidMessageError("`context` holds only system messages; nothing to absorb")
        segments = []
        for i, seg in enumerate(sync or []):
            segment = validate_messages(seg, name=f"sync[{i}]")
            if split_prefix(segment, name=f"sync[{i}]")[0]:
                raise InvalidMessageError(f"`sync[{i}]` must not contain system messages")
            segments.append(segment)
        if sync is not None and not segments:
            raise InvalidMessageError("`sync` is an empty list; pass segments or None for probes")
        n_probes = self.config.probe_count if sync is None else 0
        report = self._absorb(prefix or self._prefix, context_rest, segments, n_probes)
        self._log.append({"first": None, "count": len(context_rest), "report": report.to_dict()})
        return report

    def _absorb(
        self, prefix: list[Message], context: list[Message], segments: list[list[Message]], n_probes: int,
        lead: list[Message] | None = None,
    ) -> AbsorptionReport:
        """Algorithm 1 on this memory's own history (the first absorption is taught by the frozen model)."""
        return self.absorb_turns(
            prefix, context, segments, n_probes=n_probes, lead=lead, base_teacher=not self._log, round_index=len(self._log)
        )

    def absorb_turns(
        self,
        prefix: list[Message],
        context: list[Message],
        segments: list[list[Message]] | None = None,
        *,
        n_probes: int,
        lead: list[Message] | None = None,
        base_teacher: bool,
        round_index: int = 0,
        on_step: Callable[[int, float], None] | None = None,
    ) -> AbsorptionReport:
        """Algorithm 1 with probes, on already validated messages; the engine under `absorb` and job runners.

        Args:
            prefix: system message(s), read by teacher and student, never absorbed.
            context: C.
            segments: given sync segments S (may be empty).
            n_probes: probes to generate and answer with the teacher.
            lead: following turns; when given, the probes are asked after them in one segment.
            base_teacher: the teacher is the frozen model (no absorption yet) rather than the current adapter.
            round_index: which absorption this is (rotates the probe prompts).
            on_step: `on_step(step, loss)` after each loss; may raise to cancel (the adapter rolls back).
        """
        start = time.perf_counter()
        prompts = pick_probes(self.config.probe_prompts, n_probes, round_index)

        def answer(question: list[Message]) -> str:
            return self._generate(prefix, context + question, self.config.probe_max_new_tokens, base_teacher)

        def answer_all(questions: list[list[Message]]) -> list[str]:
            return self._generate_all(prefix, [context + q for q in questions], self.config.probe_max_new_tokens,
                                      base_teacher)

        segments = list(segments or [])
        if lead:
            segments.append(chained_probe_segment(answer, prompts, lead))
        else:
            segments += probe_segments(answer_all, prompts)
        report = self._absorber.absorb(
            prefix, context, segments, base_teacher=base_teacher, probes=len(prompts),
            teacher_seconds=time.perf_counter() - start, on_step=on_step,
        )
        log.info("absorbed %d tokens in %d steps (%.1f s), loss %.4f -> %.4f", report.context_tokens,
                 report.steps, report.seconds, report.initial_loss, report.final_loss)
        return report

    # --- the adapter's weights ----------------------------------------------------------
    def reset_adapter(self) -> None:
        """Re-initialise the adapter as new (B = 0, so the model equals the base), seeded by `seed`."""
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(self.config.seed)
            for module in self._model.modules():
                if hasattr(module, "reset_lora_parameters") and ADAPTER in getattr(module, "lora_A", {}):
                    module.reset_lora_parameters(ADAPTER, init_lora_weights=True)

    def reconfigure(self, **overrides: Any) -> None:
        """Apply new training settings (lr, steps, losses, probes, ...) and start a fresh adapter.

        For experiments that compare settings on one loaded model. The LoRA
        shape (`lora_*` fields) is fixed when the adapter is built: load a new
        `ParametricMemory` to change it. The transcript is kept.
        """
        config = AbsorberConfig(**{**self.config.model_dump(), **overrides})
        limit = prompt_limit(config, self._model.get_base_model())
        changed = sorted(k for k in overrides if k.startswith("lora_") and getattr(config, k) != getattr(self.config, k))
        if changed:
            raise ConfigError(f"{changed} shape the adapter and cannot change after it is built; load a new memory")
        self.config, self._limit = config, limit
        self._absorber = Absorber(self._model, self.fmt, config)
        self._log.clear()
        self.reset_adapter()

    def load_adapter(self, folder: str | Path) -> None:
        """Replace the adapter's weights with a PEFT folder's (shapes and values checked)."""
        load_adapter_weights(self._model, ADAPTER, Path(folder))

    def save_adapter(self, folder: str | Path) -> None:
        """Write the adapter as a PEFT folder (not atomic; see `persistence.atomic_write_dir`)."""
        save_adapter(self._model, ADAPTER, Path(folder))

    # --- generation --------------------------------------------------------------------
    def _scope(self, base: bool) -> Any:
        """The frozen base model (`base`) or the model with the adapter on, as a context manager."""
        return self._model.disable_adapter() if base else contextlib.nullcontext()

    def _generate(self, prefix: list[Message], messages: list[Message], max_new_tokens: int, base: bool,
                  **kwargs: Any) -> str:
        ids = self.fmt.encode(prefix, messages, add_generation_prompt=True)
        with self._scope(base):
            return generate_text(self._model, self._tokenizer, ids, max_new_tokens, **kwargs)

    def _generate_all(self, prefix: list[Message], conversations: list[list[Message]], max_new_tokens: int,
                      base: bool) -> list[str]:
        """`_generate` for several conversations at once (greedy, one left-padded batch)."""
        ids = [self.fmt.encode(prefix, messages, add_generation_prompt=True) for messages in conversations]
        with self._scope(base):
            new = generate_batch_ids(self._model, self._tokenizer, ids, max_new_tokens)
        return [self._tokenizer.decode(n, skip_special_tokens=True) for n in new]

    def generate(self, messages: list[dict[str, Any]] | None = None, **generation_kwargs: Any) -> str:
        """Answer `messages` (default: `context_messages()`) with the adapter active.

        Leading system messages in `messages` replace the memory's prefix for
        this call. `generation_kwargs` go to `model.generate` (e.g.
        `max_new_tokens`, `do_sample`, `temperature`).
        """
        msgs = self.context_messages() if messages is None else validate_messages(messages)
        prefix, rest = split_prefix(msgs)
        max_new = generation_kwargs.pop("max_new_tokens", self.config.max_new_tokens)
        return self._generate(prefix or self._prefix, rest, max_new, False, **generation_kwargs)

    # --- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Save adapter (PEFT format, under `path/adapter`) and state (`path/memory.json`) atomically."""
        path = Path(path)
        state = {
            "format_version": FORMAT_VERSION,
            "config": self.config.model_dump(mode="json"),
            "base_model": self.base_identity,
            "prefix": self._prefix,
            "transcript": self._transcript,
            "absorbed": self._absorbed,
            "log": self._log,
        }

        def write(tmp: Path) -> None:
            save_adapter(self._model, ADAPTER, tmp / ADAPTER_DIR)
            write_json(tmp / STATE_FILE, state)

        atomic_write_dir(path, write)
        return path

    @classmethod
    def load(cls, path: str | Path, model: str | Any | None = None, *, tokenizer: Any | None = None) -> ParametricMemory:
        """Load a memory saved with `save`.

        Args:
            path: the directory given to `save`.
            model: the base model (name, path or loaded model); default: the one
                recorded at save time. An adapter made for a different
                architecture is refused with `StorageError`.
            tokenizer: required when `model` is a loaded model.
        """
        path = Path(path)
        recover_dir(path)
        state = read_json(path / STATE_FILE)
        if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
            raise StorageError(f"{path / STATE_FILE} is not a memory of format version {FORMAT_VERSION}")
        try:
            config = AbsorberConfig(**state["config"])
            recorded = state["base_model"]
            prefix = validate_messages(state["prefix"], name="prefix", allow_empty=True)
            transcript = validate_messages(state["transcript"], name="transcript", allow_empty=True)
            absorbed = int(state["absorbed"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StorageError(f"{path / STATE_FILE} is corrupt: {exc}") from exc
        if not 0 <= absorbed <= len(transcript):
            raise StorageError(f"{path / STATE_FILE} is corrupt: absorbed={absorbed} of {len(transcript)} messages")
        if model is None:
            model = recorded.get("name") or DEFAULT_MODEL
        memory = cls(model, tokenizer=tokenizer, config=config)
        mismatch = identity_mismatch(recorded, memory.base_identity)
        if mismatch:
            raise StorageError(f"{path} was saved for another base model: (saved, given) = {mismatch}")
        load_adapter_weights(memory._model, ADAPTER, path / ADAPTER_DIR)
        memory._prefix, memory._transcript, memory._absorbed = prefix, transcript, absorbed
        memory._log = list(state.get("log", []))
        return memory
