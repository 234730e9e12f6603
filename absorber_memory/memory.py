"""`ParametricMemory`: one conversation's memory in one LoRA adapter.

The facade users touch: it keeps the transcript and runs Algorithm 2 over
it, on an `AbsorptionEngine` (`engine.py`: the model, its one LoRA adapter
and one absorption round): messages go
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
import warnings
from pathlib import Path
from typing import Any

from .absorber import AbsorptionReport
from .chat import ChatFormat, Message, check_lengths, prompt_conversation, split_prefix, validate_messages
from .config import AbsorberConfig
from .deprecation import moved_names
from .engine import ADAPTER, AbsorptionEngine
from .errors import InvalidMessageError, StorageError
from .jobs import StepCallback
from .models import DEFAULT_MODEL, identity_mismatch
from .persistence import atomic_write_dir, load_adapter_weights, read_json, recover_dir, save_adapter, write_json
from .recall import Recalled, recall_answers
from .stream import consolidation_following, idle_round, plan_absorption

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE_FILE = "memory.json"
ADAPTER_DIR = "adapter"


class MessageList(list[Message]):
    """A list of messages that can also be called, so `pm.window()` reads like `AbsorberMemory.window(sid)`.

    Reading the attribute as a list (`pm.window`) is the older spelling and still works.
    """

    def __call__(self) -> list[Message]:
        return list(self)


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
        model: str | Path | Any = DEFAULT_MODEL,
        *,
        tokenizer: Any | None = None,
        config: AbsorberConfig | dict[str, Any] | None = None,
    ) -> None:
        #: The model, its adapter and one absorption round (see `engine.py`).
        self.engine = AbsorptionEngine(model, tokenizer=tokenizer, config=config)
        self._prefix: list[Message] = []
        self._transcript: list[Message] = []
        self._absorbed = 0
        self._log: list[dict[str, Any]] = []

    # --- views -------------------------------------------------------------------
    @property
    def config(self) -> AbsorberConfig:
        return self.engine.config

    @property
    def model(self) -> Any:
        """The PEFT model (base + this memory's adapter)."""
        return self.engine.model

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def fmt(self) -> ChatFormat:
        return self.engine.fmt

    @property
    def base_identity(self) -> dict[str, Any]:
        return self.engine.base_identity

    @property
    def prefix(self) -> MessageList:
        """The system message(s): always in the prompt, never absorbed."""
        return MessageList(dict(m) for m in self._prefix)

    @property
    def transcript(self) -> MessageList:
        """Every non-system message added so far, absorbed or not, oldest first."""
        return MessageList(dict(m) for m in self._transcript)

    @property
    def window(self) -> MessageList:
        """The messages not yet absorbed (they stay in the prompt)."""
        return MessageList(dict(m) for m in self._transcript[self._absorbed :])

    @property
    def absorbed_messages(self) -> MessageList:
        """The messages now held by the adapter instead of the prompt."""
        return MessageList(dict(m) for m in self._transcript[: self._absorbed])

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

    def adapter_disabled(self) -> contextlib.AbstractContextManager[None]:
        """Within this block the model is the frozen base model."""
        return self.engine.adapter_disabled()

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
        check_lengths(self.fmt, clean, self.engine.limit)
        prefix, rest = split_prefix(clean)
        if prefix and self._transcript:
            raise InvalidMessageError("system messages must come before the conversation starts")
        self._prefix += prefix
        self._transcript += rest
        return self.absorb_overflow() if self.config.auto_absorb and self.config.absorb_when == "overflow" else []

    def absorb_overflow(self) -> list[AbsorptionReport]:
        """Absorb the oldest turns until the window fits `window_tokens` (Algorithm 2).

        With `absorb_when="idle"`, `add_messages` leaves the overflow in the window and this call (made
        when the conversation pauses) absorbs it in one round: the turns the rounds would have taken
        message by message, synced on the window left behind (all of it, or its oldest turns up to
        `sync_tokens`: `consolidation_sync`).
        """
        reports = []
        cfg = self.config
        while True:
            window = self._transcript[self._absorbed :]
            if cfg.absorb_when == "idle":  # one round; what it leaves fits, so the next pass finds nothing
                absorb, sync = idle_round(
                    window,
                    self.fmt.count,
                    window_tokens=cfg.window_tokens,
                    absorb_tokens=cfg.absorb_tokens,
                    sync_mode=cfg.consolidation_sync,
                    sync_tokens=cfg.sync_tokens,
                )
            else:
                plan = plan_absorption(
                    [self.fmt.count(m) for m in window],
                    [m["role"] for m in window],
                    window_tokens=cfg.window_tokens,
                    absorb_tokens=cfg.absorb_tokens,
                    sync_tokens=cfg.sync_tokens,
                )
                absorb, sync = (0, 0) if plan is None else (plan.absorb, plan.sync)
            if absorb == 0:
                break
            following = window[absorb : absorb + sync]
            report = self._round(self._prefix, window[:absorb], [], cfg.probe_count, following=following)
            self._log.append({"first": self._absorbed, "count": absorb, "report": report.to_dict()})
            self._absorbed += absorb
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
        check_lengths(self.fmt, context_rest, self.engine.limit, name="context")
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
        report = self._round(prefix or self._prefix, context_rest, segments, n_probes)
        self._log.append({"first": None, "count": len(context_rest), "report": report.to_dict()})
        return report

    def consolidate(self) -> AbsorptionReport | None:
        """Re-teach the adapter everything absorbed from the transcript in one round (`engine.consolidate`).

        The frozen model reading every absorbed turn teaches, the student continues from the current
        adapter, and S starts with the window's turns (all of them, or the oldest up to `sync_tokens`:
        `consolidation_sync`); nothing new is absorbed and the window is unchanged. For idle time:
        streaming rounds stop undertrained, the chained teacher (or one that no longer fits) loses early
        rounds, and a round trained right after its turns over-applies them once the window has grown.
        Returns None when nothing has been absorbed yet.

        Raises:
            ConfigError: the absorbed turns do not fit the model's context (nothing is trained).
            InvalidMessageError: the adapter holds text given to `absorb()` that the transcript does not
                hold; re-teaching from the transcript would train it away.
        """
        if any(e["first"] is None for e in self._log):
            raise InvalidMessageError(
                "the adapter holds text absorbed with `absorb()` that the transcript does not hold; "
                "consolidating from the transcript would train it away"
            )
        if not self._absorbed:
            return None
        window = self._transcript[self._absorbed :]
        cfg = self.config
        following = consolidation_following(window, self.fmt.count, cfg.consolidation_sync, cfg.sync_tokens)
        report = self.engine.consolidate(
            self._prefix, self._transcript[: self._absorbed], following, round_index=len(self._log)
        )
        self._log.append({"first": self._absorbed, "count": 0, "report": report.to_dict()})
        return report

    def _round(
        self,
        prefix: list[Message],
        context: list[Message],
        segments: list[list[Message]],
        n_probes: int,
        following: list[Message] | None = None,
    ) -> AbsorptionReport:
        """One round on this memory's own history (the first absorption is taught by the frozen model).

        Overflow rounds pass the messages absorbed so far as `history` (for the history teacher), unless
        an explicit `absorb` call put text into the adapter that the transcript does not hold.
        """
        streaming = following is not None and all(e["first"] is not None for e in self._log)
        history = self._transcript[: self._absorbed] if streaming and self.config.streaming_teacher == "history" else []
        return self.engine.run_round(
            prefix,
            context,
            segments,
            n_probes=n_probes,
            following=following,
            base_teacher=not self._log,
            history=history,
            round_index=len(self._log),
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
        on_step: StepCallback | None = None,
    ) -> AbsorptionReport:
        """Deprecated: use `engine.run_round` (with `following=` for `lead=`)."""
        warnings.warn(
            "`ParametricMemory.absorb_turns` is deprecated; use `ParametricMemory.engine.run_round`",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.engine.run_round(
            prefix,
            context,
            segments,
            n_probes=n_probes,
            following=lead,
            base_teacher=base_teacher,
            round_index=round_index,
            on_step=on_step,
        )

    # --- the adapter's weights ----------------------------------------------------------
    def reset_adapter(self) -> None:
        """Re-initialise the adapter as new (B = 0, so the model equals the base), seeded by `seed`."""
        self.engine.reset_adapter()

    def reconfigure(self, **overrides: Any) -> None:
        """Deprecated: experiments drive an `AbsorptionEngine` (`engine.reconfigure`) instead.

        Applies new training settings, starts a fresh adapter and clears the
        absorption log; the transcript is kept.
        """
        warnings.warn(
            "`ParametricMemory.reconfigure` is deprecated; use `ParametricMemory.engine.reconfigure`",
            DeprecationWarning,
            stacklevel=2,
        )
        self.engine.reconfigure(**overrides)
        self._log.clear()

    def load_adapter(self, folder: str | Path) -> None:
        """Replace the adapter's weights with a PEFT folder's (shapes and values checked)."""
        self.engine.load_adapter(folder)

    def save_adapter(self, folder: str | Path) -> None:
        """Write the adapter as a PEFT folder (not atomic; see `persistence.atomic_write_dir`)."""
        self.engine.save_adapter(folder)

    # --- generation --------------------------------------------------------------------
    def generate(self, messages: list[dict[str, Any]] | str | None = None, **generation_kwargs: Any) -> str:
        """Answer with the adapter active, as `AbsorberMemory.generate` does.

        None answers `context_messages()`; a string is a user question asked
        after them (not added to the memory); a list of messages is the whole
        conversation, and its leading system messages replace the memory's
        prefix for this call. `generation_kwargs` go to `model.generate`
        (e.g. `max_new_tokens`, `do_sample`, `temperature`). Raises
        `InvalidMessageError` when there is nothing to answer.
        """
        msgs = prompt_conversation(messages, self.context_messages, where="this memory")
        prefix, rest = split_prefix(msgs)
        max_new = generation_kwargs.pop("max_new_tokens", self.config.max_new_tokens)
        return self.engine.generate(prefix or self._prefix, rest, max_new, **generation_kwargs)

    def recall(self, questions: list[str] | None = None) -> list[Recalled]:
        """What the adapter alone holds: generic questions answered with only the prefix in the prompt, by the
        adapted model and (`base`) by the base model; see `AbsorberMemory.recall`."""
        return recall_answers(self.model, self.tokenizer, self.fmt, self._prefix, questions)

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
            save_adapter(self.model, ADAPTER, tmp / ADAPTER_DIR)
            write_json(tmp / STATE_FILE, state)

        atomic_write_dir(path, write)
        return path

    @classmethod
    def load(
        cls, path: str | Path, model: str | Any | None = None, *, tokenizer: Any | None = None
    ) -> ParametricMemory:
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
        load_adapter_weights(memory.model, ADAPTER, path / ADAPTER_DIR)
        memory._prefix, memory._transcript, memory._absorbed = prefix, transcript, absorbed
        memory._log = list(state.get("log", []))
        return memory


__getattr__ = moved_names(
    __name__,
    {
        "lora_config": "absorber_memory.config:lora_config",
        "as_config": "absorber_memory.config:as_config",
        "base_model": "absorber_memory.models:base_model",
        "prompt_limit": "absorber_memory.models:prompt_limit",
    },
)
