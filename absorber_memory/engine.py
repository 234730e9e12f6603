"""`AbsorptionEngine`: a base model with one trainable LoRA adapter, and one absorption round.

The part that knows tensors and adapters and nothing about sessions,
transcripts or storage. It loads (or wraps) a base model, injects one LoRA
adapter, and offers what everything above it needs: reset, load and save the
adapter's weights; run one absorption round (teacher answers to the probes,
then Algorithm 1, `absorber.py`); generate with the adapter on or off.

Who drives it: `ParametricMemory` (one conversation, in the foreground),
the executors (`executor.py`: one engine per training replica or worker)
and the benchmark harness (`reconfigure` between settings).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .absorber import Absorber, AbsorptionReport
from .chat import ChatFormat, Message
from .config import AbsorberConfig, as_config, lora_config
from .errors import ConfigError, InvalidMessageError
from .fused import fuse_lora_forwards
from .generation import PromptCache, generate_batch_ids, generate_text
from .jobs import StepCallback
from .models import DEFAULT_MODEL, base_model, model_identity, prompt_limit, quiet_transformers
from .persistence import load_adapter_weights, save_adapter
from .probes import (
    chained_probe_segment,
    independent_probe_segment,
    pick_probes,
    probe_segments,
    recitation_segments,
    recitation_tokens,
)
from .stream import teacher_tokens

log = logging.getLogger(__name__)

#: The name of the engine's one adapter inside its PEFT model.
ADAPTER = "default"
#: Tokens kept beyond the window's own when recording its teacher states: the probes' shared start
#: continues past the window into the chat template's opening of the next user turn.
_TEMPLATE_SLACK = 32


class AbsorptionEngine:
    """A PEFT model with one adapter that absorption rounds train in place.

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
        from peft import get_peft_model

        self.config = as_config(config)
        base, tokenizer = base_model(model, tokenizer, self.config)
        #: Most conversation tokens one prompt may hold (see `models.prompt_limit`).
        self.limit = prompt_limit(self.config, base)
        self.base_identity = model_identity(base)
        with torch.random.fork_rng(devices=[]), quiet_transformers():
            torch.manual_seed(self.config.seed)
            self.model = get_peft_model(base, lora_config(self.config, base), adapter_name=ADAPTER)
        fuse_lora_forwards(self.model)  # the same sums in fewer passes over each projection's output
        self.model.eval()
        self.tokenizer = tokenizer
        self.fmt = ChatFormat(tokenizer)
        self.absorber = Absorber(self.model, self.fmt, self.config)

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Within this block the model is the frozen base model."""
        with self.model.disable_adapter():
            yield

    # --- the adapter's weights ------------------------------------------------------------
    def reset_adapter(self) -> None:
        """Re-initialise the adapter as new (B = 0, so the model equals the base), seeded by `seed`.

        A is drawn as PEFT draws it (Kaiming-uniform, `a = sqrt(5)`) but from this
        call's own generator, on the CPU in fp32, then copied into place. The global
        RNG is neither read nor reseeded, so engines resetting on several threads at
        once give each the same adapter as one resetting alone, and the start is the
        same on every device.
        """
        from peft.tuners.lora import LoraLayer

        generator = torch.Generator().manual_seed(self.config.seed)
        with torch.no_grad():
            for module in self.model.modules():
                if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                    a: Any = module.lora_A[ADAPTER]
                    b: Any = module.lora_B[ADAPTER]
                    drawn = torch.empty(a.weight.shape, dtype=torch.float32)
                    torch.nn.init.kaiming_uniform_(drawn, a=math.sqrt(5), generator=generator)
                    a.weight.copy_(drawn)
                    b.weight.zero_()
                    if b.bias is not None:
                        b.bias.zero_()

    def load_adapter(self, folder: str | Path) -> None:
        """Replace the adapter's weights with a PEFT folder's (shapes and values checked)."""
        load_adapter_weights(self.model, ADAPTER, Path(folder))

    def save_adapter(self, folder: str | Path) -> None:
        """Write the adapter as a PEFT folder (not atomic; see `persistence.atomic_write_dir`)."""
        save_adapter(self.model, ADAPTER, Path(folder))

    def reconfigure(self, **overrides: Any) -> None:
        """Apply new training settings (lr, steps, losses, probes, ...) and start a fresh adapter.

        For experiments that compare settings on one loaded model. The LoRA
        shape (`lora_*` fields) is fixed when the adapter is built: build a new
        engine to change it.
        """
        config = AbsorberConfig(**{**self.config.model_dump(), **overrides})
        limit = prompt_limit(config, self.model.get_base_model())
        changed = sorted(
            k for k in overrides if k.startswith("lora_") and getattr(config, k) != getattr(self.config, k)
        )
        if changed:
            raise ConfigError(f"{changed} shape the adapter and cannot change after it is built; load a new memory")
        self.config, self.limit = config, limit
        self.absorber = Absorber(self.model, self.fmt, config)
        self.reset_adapter()

    # --- one absorption round -------------------------------------------------------------
    def run_round(
        self,
        prefix: list[Message],
        context: list[Message],
        segments: list[list[Message]] | None = None,
        *,
        n_probes: int,
        following: list[Message] | None = None,
        base_teacher: bool,
        history: list[Message] | None = None,
        round_index: int = 0,
        on_step: StepCallback | None = None,
        max_steps: int | None = None,
    ) -> AbsorptionReport:
        """Absorb `context` into the adapter: probe answers from the teacher, then Algorithm 1.

        Messages must already be validated.

        Args:
            prefix: system message(s), read by teacher and student, never absorbed.
            context: C.
            segments: given sync segments S (may be empty).
            n_probes: probes to generate and answer with the teacher.
            following: the turns after C; when given, the probes are asked after them in one segment.
            base_teacher: the teacher is the frozen model (no absorption yet) rather than the current adapter.
            round_index: which absorption this is (rotates the probe prompts).
            history: the messages earlier rounds absorbed, oldest first. When `[prefix; history; C; S]`
                fits the context, the frozen model reading all of it teaches this round (probe answers
                included) and the student continues from the current adapter; otherwise the current
                adapter reading C alone teaches (the chained teacher).
            on_step: `on_step(step, loss)` after each loss; may raise to cancel (the adapter rolls back).
            max_steps: most optimizer steps (None: `config.max_steps`).
        """
        start = time.perf_counter()
        prompts = pick_probes(self.config.probe_prompts, n_probes, round_index)
        max_new = self.config.probe_max_new_tokens
        kind, read = ("frozen" if base_teacher else "chained"), context
        recited = recitation_segments(context, self.config.sync_recitation, following)
        quoted = recitation_tokens(self.fmt.count, context, self.config.sync_recitation)
        if (
            history
            and not base_teacher
            and self.history_fits(prefix, history + context, following, len(prompts), quoted)
        ):
            kind, read, base_teacher = "history", history + context, True

        # Each chained probe extends the last prompt: read the history once. Answers to independent probes
        # after the window keep the window's states: the teacher's targets there are read off them.
        window = sum(self.fmt.count(m) for m in following or []) + _TEMPLATE_SLACK
        chain = PromptCache(
            record=window if following and self.config.probe_answers == "independent" else 0,
            record_logits=self.config.losses.get("logit_kl", 0) > 0,
        )

        def answer(question: list[Message]) -> str:
            return self.generate(prefix, read + question, max_new, base=base_teacher, cache=chain)

        def answer_all(questions: list[list[Message]]) -> list[str]:
            return self.generate_all(prefix, [read + q for q in questions], max_new, base=base_teacher, cache=chain)

        segments = list(segments or []) + recited
        held = held_out_probes(self.config, len(prompts))
        holdout = [0] * len(segments)
        if following:
            if self.config.probe_answers == "independent":
                segments.append(independent_probe_segment(answer_all, prompts, following))
            else:
                segments.append(chained_probe_segment(answer, prompts, following))
            holdout.append(2 * held)  # the last probes' questions and answers, at the end of the chain
        else:
            segments += probe_segments(answer_all, prompts)
            held = max(0, min(held, len(segments) - 1))  # whole probe segments, the last ones; one segment must train
            holdout += [0] * (len(prompts) - held) + [2] * held
        report = self.absorber.train(
            prefix,
            read,
            segments,
            base_teacher=base_teacher,
            probes=len(prompts),
            teacher_seconds=time.perf_counter() - start,
            on_step=on_step,
            holdout=holdout,
            read=chain,  # the probe answers' cache holds [prefix; read]: the targets do not read it again
            max_steps=max_steps,
            leads=[len(following) if following and seg[: len(following)] == following else 0 for seg in segments],
        )
        report.teacher, report.teacher_context_tokens = kind, report.context_tokens
        report.context_tokens = len(self.fmt.encode_segments(context))
        log.info(
            "absorbed %d tokens in %d steps (%.1f s), loss %.4f -> %.4f",
            report.context_tokens,
            report.steps,
            report.seconds,
            report.initial_loss,
            report.final_loss,
        )
        return report

    def history_fits(
        self,
        prefix: list[Message],
        teacher_context: list[Message],
        following: list[Message] | None,
        probes: int,
        extra_tokens: int = 0,
    ) -> bool:
        """Whether a teacher reading `[prefix; teacher_context; following; probes and answers]` fits the context.

        Each probe is allowed 32 tokens for its question plus `probe_max_new_tokens` for its answer;
        `extra_tokens` (e.g. recited turns) are counted on top, as if all sat in one segment.
        """
        needed = teacher_tokens(
            len(self.fmt.prefix_ids(prefix)),
            sum(self.fmt.count(m) for m in teacher_context + (following or [])),
            probes,
            self.config.probe_max_new_tokens,
            extra_tokens,
        )
        return needed <= self.limit

    def consolidate(
        self,
        prefix: list[Message],
        history: list[Message],
        following: list[Message] | None = None,
        *,
        round_index: int = 0,
        on_step: StepCallback | None = None,
    ) -> AbsorptionReport:
        """Re-teach the current adapter everything absorbed so far, in one round; nothing new is absorbed.

        The frozen model reading `[prefix; history; following; probes]` teaches (its probe answers included),
        and the student continues from the current adapter reading `[prefix; following; probes]`: one more
        round of the history teacher, with no new chunk, for idle time (streaming rounds stop undertrained),
        of at most `consolidation_steps` steps.

        Args:
            prefix: system message(s).
            history: every message absorbed so far, oldest first.
            following: the turns after them still in the window (the start of S), or None.
        Raises:
            ConfigError: `[prefix; history; following; probes]` does not fit the model's context, so no
                teacher can read all of it (the adapter is untouched).
            InvalidMessageError: `history` is empty.
        """
        if not history:
            raise InvalidMessageError("nothing has been absorbed yet: there is no history to consolidate")
        probes = len(pick_probes(self.config.probe_prompts, self.config.probe_count, round_index))
        quoted = recitation_tokens(self.fmt.count, history, self.config.sync_recitation)
        if not self.history_fits(prefix, history, following, probes, quoted):
            tokens = sum(self.fmt.count(m) for m in history)
            raise ConfigError(
                f"cannot consolidate: the absorbed history ({tokens} tokens), the following turns and "
                f"{probes} probes do not fit the model's context ({self.limit} tokens), so no teacher can read it all"
            )
        report = self.run_round(
            prefix,
            history,
            n_probes=self.config.probe_count,
            following=following or None,
            base_teacher=True,
            round_index=round_index,
            on_step=on_step,
            max_steps=self.config.consolidation_steps,
        )
        report.teacher, report.kind = "history", "consolidation"
        return report

    # --- generation -----------------------------------------------------------------------
    def scope(self, base: bool) -> contextlib.AbstractContextManager[Any]:
        """The frozen base model (`base`) or the model with the adapter on, as a context manager."""
        return self.model.disable_adapter() if base else contextlib.nullcontext()

    def generate(
        self,
        prefix: list[Message],
        messages: list[Message],
        max_new_tokens: int,
        *,
        base: bool = False,
        cache: PromptCache | None = None,
        **kwargs: Any,
    ) -> str:
        """Answer `messages` under `prefix` with the adapter on (or the frozen model, with `base`).

        With `cache`, the prompt's start that the last generation through it already read is not read again
        (the cache must only ever see one of the two model states).
        """
        ids = self.fmt.encode(prefix, messages, add_generation_prompt=True)
        with self.scope(base):
            if cache is None:
                return generate_text(self.model, self.tokenizer, ids, max_new_tokens, **kwargs)
            new = cache.generate_ids(self.model, self.tokenizer, ids, max_new_tokens, **kwargs)
        return self.tokenizer.decode(new, skip_special_tokens=True).strip()

    def generate_all(
        self,
        prefix: list[Message],
        conversations: list[list[Message]],
        max_new_tokens: int,
        *,
        base: bool = False,
        cache: PromptCache | None = None,
    ) -> list[str]:
        """`generate` for several conversations at once (greedy, one left-padded batch).

        Conversations sharing a long start run one by one through `cache` (see `generate_batch_ids`).
        """
        ids = [self.fmt.encode(prefix, messages, add_generation_prompt=True) for messages in conversations]
        with self.scope(base):
            new = generate_batch_ids(self.model, self.tokenizer, ids, max_new_tokens, cache=cache)
        return [self.tokenizer.decode(n, skip_special_tokens=True) for n in new]


def held_out_probes(config: AbsorberConfig, probes: int) -> int:
    """How many of a round's `probes` early stopping holds out of training (0 when it is off)."""
    if config.early_stopping_patience == 0 or probes == 0:
        return 0
    return min(probes, max(1, round(config.early_stopping_holdout * probes)))
