"""Typed settings for absorption (Algorithm 1), the window (Algorithm 2) and the runtime.

One flat pydantic model, so a field is named the same in Python, JSON, a job
payload and the CLI (`AbsorberConfig(sync_tokens=128, lr=3e-4)`). Every field
has a default and a one-line description; invalid values fail at construction
with a `ConfigError` (a `ValueError`) whose message names the field in
backticks. The config is plain data: it serializes with `model_dump()` and is
rebuilt anywhere with `AbsorberConfig(**data)`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError
from .probes import DEFAULT_PROBES

#: Loss names `losses` accepts; see `absorber_memory.losses`.
LOSS_NAMES = ("l1", "mse", "logit_kl", "lm")

#: The paper's plain recipe, overriding the three defaults added on top of it: L1 on hidden states only,
#: probe answers as the only sync text beside the following turns, no consolidation. A third of the
#: defaults' absorption time, for throughput over recall (BENCHMARKS.md, "Consolidation on the reported sessions").
PLAIN_RECIPE: dict[str, Any] = {"sync_recitation": "off", "losses": {"l1": 1.0}, "consolidate_when_idle": None}
#: The measured setting for long, chatty sessions with pauses (BENCHMARKS.md, "Answers of 16, 20 and 24
#: tokens"): the plain recipe, the overflow absorbed in one round once the session is idle, syncing on the whole
#: window; every third step refreshes the window's keys and values (trained at the first step only) and the steps
#: between train the probes after them; 20 steps at 1.5e-3; the teacher answers each probe straight after the
#: window (all decoded together), 20 tokens each. 0.70 of the fidelity gap closed on ~4k-token sessions at 9-10x a
#: prefill per absorbed token on a 2-core CPU. Window sizes are left to the caller (measured with 1,280 / 1,024).
LONG_SESSION_RECIPE: dict[str, Any] = {
    **PLAIN_RECIPE,
    "consolidate_when_idle": 0.0,
    "absorb_when": "idle",
    "window_grad_every": 3,
    "train_window": False,
    "max_steps": 20,
    "lr": 1.5e-3,
    "probe_answers": "independent",
    "probe_max_new_tokens": 20,
}
_SYNC_LOSSES = ("l1", "mse", "logit_kl")

_OPS = {
    "greater_than": ("> ", "gt"),
    "greater_than_equal": (">= ", "ge"),
    "less_than": ("< ", "lt"),
    "less_than_equal": ("<= ", "le"),
}


def _describe(exc: ValidationError) -> str:
    """Turn pydantic's report into one line per field: "`field` must be > 0, got 0"."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "config"
        op = _OPS.get(err["type"])
        if op is not None:
            text = f"must be {op[0]}{err['ctx'][op[1]]}"
        elif err["type"] == "extra_forbidden":
            text = "is not a known setting"
        else:
            text = err["msg"][0].lower() + err["msg"][1:]
            text = text.removeprefix("value error, ")
        got = "" if err["type"] == "missing" else f", got {err.get('input')!r}"
        lines.append(f"`{field}` {text}{got}")
    return "; ".join(lines)


class AbsorberConfig(BaseModel):
    """All settings of one memory; every field has a working default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- runtime -----------------------------------------------------------
    device: str = Field("auto", description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; 'auto' is float32 on CPU (bf16 is slow there) and bfloat16 on GPU."
    )
    num_threads: int | None = Field(
        None, ge=1, description="torch CPU threads; None uses the cores this process may run on."
    )
    seed: int = Field(0, description="Seed for LoRA initialisation, so runs are reproducible.")
    show_progress: bool = Field(False, description="Show tqdm bars for absorption steps (off in library use).")

    # --- LoRA adapter --------------------------------------------------------
    lora_rank: int = Field(16, gt=0, le=1024, description="LoRA rank r.")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input during training.")
    lora_targets: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules to adapt: 'all-linear' (every projection but the LM head) or names."
    )
    lora_layers: list[int] | None = Field(
        None,
        min_length=1,
        description="Decoder layers to adapt, by index; negative ones count from the top ([-8, ..., -1] = the last "
        "8 of any model). None adapts every layer. A step's backward pass stops at the lowest adapted layer, so "
        "upper layers alone train cheaper steps, at a price in fidelity (BENCHMARKS.md, 'Adapting the upper layers "
        "only').",
    )

    # --- Algorithm 1: one absorption ----------------------------------------
    lr: float = Field(1e-3, gt=0, le=1, description="AdamW learning rate on the LoRA weights.")
    max_steps: int = Field(30, ge=1, le=100_000, description="Most optimizer steps per absorption.")
    loss_threshold: float = Field(0.0, ge=0, description="Stop early once the loss is below this (0: never).")
    early_stopping_patience: int = Field(
        0,
        ge=0,
        le=100_000,
        description="Stop once the loss on held-out probes has not improved for this many steps, keeping the best "
        "adapter seen (0: off, run `max_steps`). Needs probes (`probe_count` > 0). Use 5 or more: AdamW's first "
        "step raises that loss before it falls.",
    )
    early_stopping_holdout: float = Field(
        0.25,
        gt=0,
        lt=1,
        description="Share of each round's probes held out of training to measure that loss (at least one probe).",
    )
    losses: dict[str, float] = Field(
        default_factory=lambda: {"l1": 1.0, "logit_kl": 0.25},
        description="Weighted loss mix; names: l1, mse (hidden-state sync), logit_kl, lm (TTT baseline). The default "
        "adds a quarter-weight KL of the next-token distributions to the paper's L1 on hidden states.",
    )
    sync_batch_segments: int | None = Field(
        None,
        gt=0,
        le=4096,
        description="Sync segments per optimizer step (None: all every step); more make each step a shuffled subset.",
    )
    micro_batch_tokens: int = Field(
        1024,
        gt=0,
        le=1_000_000,
        description="Most padded tokens per student forward; a step's segments run longest first in groups under "
        "this budget, their gradients added (same loss, no padding of short segments to the longest).",
    )
    window_grad_every: int = Field(
        1,
        ge=1,
        le=100_000,
        description="Streaming rounds: train through the window's turns (the start of S) only every this many steps. "
        "On the steps between, the student reads the window through the keys and values of the last such step, "
        "detached, and trains on what follows it (probes, recitations) alone, at the cost of those tokens only. "
        "1: every step reads and trains the whole of S (the paper's). On long sessions absorbed once idle, 3 "
        "measured 0.74 of the gap at 18x a prefill per token against 0.75 at 30x (BENCHMARKS.md, 'Steps that read "
        "the window through stored keys and values').",
    )
    train_window: bool = Field(
        True,
        description="With `window_grad_every` k > 1: False never trains through the window after the first step; "
        "every k-th step instead re-reads it without gradients (a forward, about a third of a training pass) to "
        "refresh the stored keys and values, and every step trains only what follows it. On long sessions absorbed "
        "once idle (k = 3, 20 steps, independent probe answers) it closed 0.71 of the gap at 11.5x a prefill per "
        "token (BENCHMARKS.md, 'The cheaper teacher and the untrained window'). Step 0 must train through the "
        "window: never doing so lost 0.10 of the gap on the dev sessions for no measurable saving (BENCHMARKS.md, "
        "'Fewer window reads').",
    )
    update_penalty: Literal["none", "l1", "l2"] = Field(
        "none", description="Regulariser on the LoRA update delta-W (paper's L1 vs L2 ablation)."
    )
    update_penalty_weight: float = Field(0.0, ge=0, description="Weight of `update_penalty` in the loss.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; None disables it.")

    # --- sync text: probes ---------------------------------------------------
    probe_count: int = Field(8, ge=0, le=64, description="Self-generated probes per absorption (0: none).")
    probe_max_new_tokens: int = Field(24, gt=0, le=4096, description="Length of each teacher answer to a probe.")
    probe_answers: Literal["chained", "independent"] = Field(
        "chained",
        description="Streaming rounds, whose probes follow the window's turns in one segment: `chained` = the "
        "teacher answers each probe after the earlier probes and answers, one at a time; `independent` = each "
        "straight after the window (where inference asks the next question), all decoded together in one "
        "sequence, a faster teacher; the segment chains them either way. On long sessions absorbed once idle it "
        "halved the teacher's time at the same fidelity (BENCHMARKS.md, 'A cheaper teacher').",
    )
    streaming_teacher: Literal["history", "chained"] = Field(
        "history",
        description="Teacher of a later streaming round: `history` = the frozen model reading every absorbed message "
        "(falls back to `chained` when that does not fit the context); `chained` = the current adapter reading C only.",
    )
    sync_recitation: Literal["off", "each", "after"] = Field(
        "after",
        description="Sync text quoting each absorbed user turn after 'Remind me what I told you.': `each` = one "
        "segment per turn after the prefix, `after` = all of them after the following turns (`off`: none).",
    )
    probe_prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROBES),
        description="Generic, context-free probe questions; rotated across absorptions.",
    )

    # --- Algorithm 2: the window ---------------------------------------------
    window_tokens: int = Field(512, gt=0, description="Token budget of recent turns kept in the prompt.")
    absorb_tokens: int = Field(256, gt=0, description="About how many of the oldest tokens to absorb per round (n).")
    sync_tokens: int = Field(256, ge=0, description="Most tokens of following turns used as sync text S (m).")
    auto_absorb: bool = Field(True, description="Absorb as soon as the window overflows when messages are added.")
    absorb_when: Literal["overflow", "idle"] = Field(
        "overflow",
        description="AbsorberMemory, with `auto_absorb`: when a session's overflow is absorbed. `overflow` = in "
        "rounds of `absorb_tokens` as soon as the window overflows (Algorithm 2); `idle` = the overflow stays in "
        "the prompt until the session has had no new message for `idle_seconds` (or `flush` is called, or the "
        "window no longer fits the prompt), then one round absorbs everything beyond `window_tokens`, its sync "
        "text the window left behind (as a consolidation's: `consolidation_sync`): one larger, rarer round that "
        "needs no consolidation after it.",
    )
    idle_seconds: float = Field(
        30.0,
        ge=0,
        le=86_400,
        description="With `absorb_when='idle'`: seconds without a new message in a session before its overflow "
        "is absorbed (0: as soon as each add returns, in one round for what that add brought).",
    )
    consolidate_when_idle: float | None = Field(
        0.0,
        ge=0,
        le=86_400,
        description="AbsorberMemory: seconds a session must stay idle after an absorption round (no new round "
        "queued or committed) before one consolidation round re-teaches its adapter everything absorbed so far "
        "(`AbsorberMemory.consolidate`); 0 = as soon as its queue is empty, None = never.",
    )

    reconsolidate_tokens: int | None = Field(
        None,
        gt=0,
        le=1_000_000,
        description="AbsorberMemory, with `consolidate_when_idle`: consolidate again, once idle, when this many "
        "tokens of turns have come into the window since the adapter was last taught (its last round or "
        "consolidation), so it follows the absorbed turns as they sit further back (None: only after rounds).",
    )
    consolidation_sync: Literal["window", "head"] = Field(
        "window",
        description="Turns a consolidation's (and an idle round's, `absorb_when='idle'`) sync text starts with, "
        "before its probes: `window` = every turn still "
        "in the prompt, so the adapter learns what the absorbed turns do as far back as they now sit (a round "
        "trains right after them, and over-applies them once the window has grown); `head` = the window's oldest "
        "turns up to `sync_tokens`, as a round does.",
    )
    consolidation_steps: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Most optimizer steps of a consolidation (None: `max_steps`). It continues from an adapter "
        "the rounds already trained, so it may need fewer steps than a round.",
    )

    # --- generation ------------------------------------------------------------
    max_new_tokens: int = Field(128, gt=0, description="Default answer length for `generate`.")

    # --- many sessions (AbsorberMemory) -------------------------------------------
    absorb_workers: int = Field(1, ge=1, le=64, description="Training threads (each a replica sharing base weights).")
    max_loaded_adapters: int = Field(
        8, ge=1, le=10_000, description="Session adapters kept loaded for inference (LRU)."
    )
    context_tokens: int | None = Field(
        None,
        gt=0,
        description="Most window tokens put in a prompt while absorption catches up, and the longest message accepted "
        "(None: model context - max_new_tokens).",
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    @model_validator(mode="after")
    def _check_consistency(self) -> AbsorberConfig:
        unknown = sorted(set(self.losses) - set(LOSS_NAMES))
        if unknown:
            raise ValueError(f"`losses` has unknown names {unknown}; choose from {list(LOSS_NAMES)}")
        if any(w < 0 for w in self.losses.values()) or not any(w > 0 for w in self.losses.values()):
            raise ValueError(f"`losses` weights must be >= 0 with at least one > 0, got {self.losses}")
        if self.absorb_tokens > self.window_tokens:
            raise ValueError(
                f"`absorb_tokens` must be <= `window_tokens` ({self.window_tokens}), got {self.absorb_tokens}"
            )
        if any(not p.strip() for p in self.probe_prompts):
            raise ValueError("`probe_prompts` must not contain empty prompts")
        if self.probe_count > 0 and not self.probe_prompts:
            raise ValueError("`probe_prompts` must not be empty when `probe_count` > 0")
        needs_sync = any(self.losses.get(name, 0) > 0 for name in _SYNC_LOSSES)
        if needs_sync and self.probe_count == 0 and self.sync_tokens == 0:
            raise ValueError("`probe_count` and `sync_tokens` are both 0: a sync loss has no text S to align on")
        if self.lora_layers is not None and len(set(self.lora_layers)) != len(self.lora_layers):
            raise ValueError(f"`lora_layers` must not repeat a layer, got {self.lora_layers}")
        if self.update_penalty != "none" and self.update_penalty_weight == 0:
            raise ValueError(f"`update_penalty_weight` must be > 0 when `update_penalty` is {self.update_penalty!r}")
        return self

    def sync_losses(self) -> dict[str, float]:
        """The weights of the losses that need teacher states on S."""
        return {k: w for k, w in self.losses.items() if k in _SYNC_LOSSES and w > 0}


def as_config(config: AbsorberConfig | dict[str, Any] | None) -> AbsorberConfig:
    """An `AbsorberConfig` from None (defaults), a config, or a dict of fields."""
    if config is None:
        return AbsorberConfig()
    if isinstance(config, AbsorberConfig):
        return config
    if isinstance(config, dict):
        return AbsorberConfig(**config)
    raise ConfigError(f"`config` must be an AbsorberConfig or a dict, got {type(config).__name__}")


def lora_config(config: AbsorberConfig, model: Any = None) -> Any:
    """The PEFT `LoraConfig` for a memory's settings (peft is imported here, on first use).

    `model` (the base model) is needed only with `lora_layers`: its layer count
    resolves negative indices, and 'all-linear' becomes the names of its linear
    layers, since PEFT selects layers by index only among named targets.
    """
    from peft import LoraConfig

    targets: list[str] | str = config.lora_targets
    layers = None
    if config.lora_layers is not None:
        if model is None:
            raise ConfigError("`lora_layers` needs the base model to resolve layer indices")
        layers = resolve_layers(config.lora_layers, decoder_layer_count(model))
        if targets == "all-linear":
            targets = linear_module_names(model)
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,  # type: ignore[arg-type]  # peft annotates int, scales by alpha / r: floats work
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        layers_to_transform=layers,
        bias="none",
        task_type="CAUSAL_LM",
    )


def decoder_layer_count(model: Any) -> int:
    """How many decoder layers `model` has (its config's `num_hidden_layers`)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int) or count <= 0:
        raise ConfigError(f"`lora_layers` needs a model whose config has `num_hidden_layers`, got {count!r}")
    return count


def resolve_layers(layers: list[int], count: int) -> list[int]:
    """`lora_layers` as sorted non-negative indices into `count` layers (negative ones count from the top)."""
    bad = [i for i in layers if not -count <= i < count]
    if bad:
        span = f"{-count}..{count - 1}"
        raise ConfigError(f"`lora_layers` has indices {bad} outside this model's {count} layers ({span})")
    resolved = sorted({i % count for i in layers})
    if len(resolved) != len(layers):
        raise ConfigError(f"`lora_layers` names a layer twice (from the top and the bottom): {layers}")
    return resolved


def linear_module_names(model: Any) -> list[str]:
    """The names (last part) of `model`'s linear layers but its LM head: what PEFT's 'all-linear' adapts."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head and name
    }
    return sorted(names)
