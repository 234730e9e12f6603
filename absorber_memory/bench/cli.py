"""`absorber-memory bench {fidelity,latency,ablations,streaming,all}`: run the suite; JSON, tables and plots.

`--quick` shrinks every experiment (fewer conversations, queries, steps and
lengths) to a few minutes on a 2-core CPU; the full settings are what
BENCHMARKS.md reports. `--model tiny` runs on the in-process test model (for
CI: the files appear, the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .data import chitchat_conversations, persona_conversation
from .experiments import ablation_experiment, fidelity_experiment
from .latency import latency_experiment
from .methods import METHODS
from .report import markdown_table, plot_ablations, plot_fidelity, plot_latency, write_outputs

#: Sizes of each mode: (quick, full).
SETTINGS: dict[str, dict[str, Any]] = {
    "quick": dict(
        dev_persona=[100],
        dev_chitchat=0,
        test_persona=[1],
        test_chitchat=0,
        queries=3,
        steps=4,
        lrs=[1e-3],
        probes=2,
        max_new_tokens=12,
        lengths=[256, 512],
        window=128,
        new_tokens=4,
        ablation={
            "absorb_turns": [4],
            "sync_tokens": [0],
            "update_penalty": [("l2", 1e-3)],
            "lora_rank": [16, 4],
            "steps": [2],
            "loss_threshold": [0.05],
        },
    ),
    "full": dict(
        dev_persona=[100],
        dev_chitchat=0,
        test_persona=[1, 2],
        test_chitchat=1,
        queries=6,
        steps=20,
        lrs=[1e-4, 3e-4, 1e-3, 3e-3],
        probes=4,
        max_new_tokens=24,
        lengths=[1024, 2048, 4096, 8192, 16384],
        window=512,
        new_tokens=16,
        ablation={
            "absorb_turns": [2, 4, 8],
            "sync_tokens": [0, 16, 64],
            "update_penalty":
            # mean |delta-W| is ~1e-3 and mean delta-W^2 ~1e-6 after 20 steps, against a sync
            # loss of ~0.1: the small weights show no effect, the large ones are comparable
            [("none", 0.0), ("l1", 1e-4), ("l2", 1e-3), ("l1", 3.0), ("l1", 30.0), ("l2", 3e3), ("l2", 3e4)],
            "lora_rank": [16, 4, 8],
            "steps": [5, 10, 40],
            "loss_threshold": [0.05],
        },
    ),
}

#: The streaming benchmark's sessions and window (full: the setting the agent path is judged on).
STREAMING: dict[str, dict[str, Any]] = {
    "quick": dict(
        dev=[100],
        test=[0],
        chat_messages=6,
        queries=3,
        window=60,
        absorb=30,
        sync=30,
        max_new_tokens=8,
        train=dict(max_steps=4, probe_count=2, probe_max_new_tokens=8),
    ),
    "full": dict(
        dev=[100, 101],
        test=[0, 1, 2],
        chat_messages=14,
        queries=6,
        window=256,
        absorb=128,
        sync=128,
        max_new_tokens=24,
        train={},
    ),
}

#: `--long`: each session's real chat is 12 chats one after another (3.4-4.4k tokens of transcript, the
#: length the cost target is stated at), absorbed in rounds of 1,024 tokens; a round never absorbs more
#: than the window holds, so the window is 1,280 tokens (256 after a round); the rest as above.
LONG_STREAMING: dict[str, dict[str, Any]] = {
    "quick": dict(chats=3, window=90, absorb=60),
    "full": dict(chats=12, window=1280, absorb=1024),
}


def _loader(model: str, device: str, threads: int | None) -> Any:
    """A function rank -> fresh AbsorptionEngine (a new base model each call, so LoRA shapes can differ)."""
    from ..engine import AbsorptionEngine

    def load(rank: int = 16) -> Any:
        config = dict(lora_rank=rank, lora_alpha=2.0 * rank, device=device, num_threads=threads, show_progress=False)
        if model == "tiny":
            from ..testing import tiny_model_and_tokenizer

            base, tok = tiny_model_and_tokenizer()
            return AbsorptionEngine(base, tokenizer=tok, config=config)
        return AbsorptionEngine(model, config=config)

    return load


def _streaming(
    out: Path,
    quick: bool,
    model: str,
    device: str,
    threads: int | None,
    split: str,
    overrides: dict[str, Any],
    meta: dict[str, Any],
    variants: dict[str, dict[str, Any]] | None = None,
    teachers: list[str] | None = None,
    *,
    long: bool = False,
    sessions: int | None = None,
) -> list[Path]:
    """`bench streaming`: the agent path against full context, truncation, running summary and one-shot.

    `long` streams the long sessions (`LONG_STREAMING`); `sessions` keeps the split's first sessions only.
    """
    from tqdm.auto import tqdm

    from ..config import AbsorberConfig
    from ..engine import AbsorptionEngine
    from ..sessions import AbsorberMemory
    from .streaming import agent_chats, plot_streaming, streaming_experiment

    size = "quick" if quick else "full"
    st = {**STREAMING[size], "chats": 1, **(LONG_STREAMING[size] if long else {})}
    if sessions is not None:
        if not 1 <= sessions <= len(st[split]):
            raise SystemExit(f"--sessions: the {split} split has {len(st[split])} sessions, got {sessions}")
        st[split] = st[split][:sessions]
    base = dict(
        window_tokens=st["window"],
        absorb_tokens=st["absorb"],
        sync_tokens=st["sync"],
        device=device,
        num_threads=threads,
        show_progress=False,
        **st["train"],
    )
    config = AbsorberConfig(**{**base, **overrides})  # bad `--set` values fail here, before anything loads
    first = config.streaming_teacher
    teachers = teachers or [first, *(t for t in ("history", "chained") if t != first)]
    streams: dict[str, dict[str, Any]] = {f"stream-{t}": {"streaming_teacher": t} for t in teachers}
    for name, extra in (variants or {}).items():
        AbsorberConfig(**{**base, **overrides, **extra})  # a bad variant fails here, before anything loads
        streams[f"stream-{name}"] = extra

    def loaded() -> tuple[Any, Any]:
        if model == "tiny":
            from ..testing import tiny_model_and_tokenizer

            return tiny_model_and_tokenizer()
        return model, None

    def configured(extra: dict[str, Any]) -> AbsorberConfig:
        """The run's config with a row's overrides (validated again: `model_copy` does not validate)."""
        return AbsorberConfig(**config.model_copy(update=extra).model_dump())

    def load_engine(extra: dict[str, Any]) -> Any:
        m, tok = loaded()
        return AbsorptionEngine(m, tokenizer=tok, config=configured(extra))

    def make_memory(data_dir: Path, extra: dict[str, Any]) -> Any:
        m, tok = loaded()
        return AbsorberMemory(m, tokenizer=tok, config=configured(extra), data_dir=data_dir)

    chats = agent_chats(
        st[split],
        st["chat_messages"],
        chitchat_seed=0 if split == "test" else 1,
        queries=st["queries"],
        chats=st["chats"],
    )
    bar = tqdm(total=len(chats) * (len(streams) + 6), desc="streaming", unit="run")
    started = time.perf_counter()
    result = streaming_experiment(
        load_engine, make_memory, chats, streams=streams, max_new_tokens=st["max_new_tokens"], tick=_ticker(bar)
    )
    bar.close()
    settings = {
        **st,
        "split": split,
        "long": long,
        "config": config.model_dump(mode="json"),
        "streams": streams,
        "wall_seconds": time.perf_counter() - started,
    }
    table = markdown_table(
        result["rows"],
        [
            "method",
            "kl",
            "gap_closed",
            "gap_per_session",
            "gap_where_full_right",
            "recall",
            "relative_recall",
            "seconds",
            "steps_per_round",
            "absorbed_tokens",
            "s_per_absorbed_token",
            "x_prefill_4k",
            "train_gflops",
            "work_gflops",
            "teachers",
        ],
    )
    return write_outputs(out, "streaming", {**meta, "settings": settings, **result}, table, plot_streaming)


def parse_variants(specs: list[list[str]] | None) -> dict[str, dict[str, Any]]:
    """`[["recite", "sync_recitation=after"]]` -> `{"recite": {"sync_recitation": "after"}}` (see `--variant`)."""
    out: dict[str, dict[str, Any]] = {}
    for spec in specs or []:
        name, *pairs = spec
        if "=" in name or not pairs or name in ("history", "chained") or name in out:
            raise SystemExit(f"--variant: expected a new NAME then KEY=VALUE pairs, got {spec!r}")
        out[name] = parse_overrides(pairs)
    return out


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """`["probe_count=16", "lr=3e-4"]` -> config overrides (values parsed as JSON where they parse)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set: expected KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _machine() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _conversations(s: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    def cut(convs: list[Any]) -> list[Any]:
        return [replace(c, queries=c.queries[: s["queries"]], keywords=c.keywords[: s["queries"]]) for c in convs]

    dev = [persona_conversation(i) for i in s["dev_persona"]] + chitchat_conversations(s["dev_chitchat"], seed=1)
    test = [persona_conversation(i) for i in s["test_persona"]] + chitchat_conversations(s["test_chitchat"], seed=0)
    return cut(dev), cut(test)


def _round_seconds(pm: Any, steps: int, probes: int, absorb_tokens: int, sync_tokens: int) -> float:
    """Time one absorption round of the latency benchmark's shape (n and m tokens of essay text)."""
    from .data import haystack_text

    ids = pm.tokenizer(haystack_text(8 * (absorb_tokens + sync_tokens)), add_special_tokens=False)["input_ids"]
    context = [{"role": "user", "content": pm.tokenizer.decode(ids[:absorb_tokens])}]
    sync = [{"role": "user", "content": pm.tokenizer.decode(ids[absorb_tokens : absorb_tokens + sync_tokens])}]
    pm.reconfigure(losses={"l1": 1.0}, max_steps=steps, loss_threshold=0.0, probe_count=probes)
    start = time.perf_counter()
    pm.run_round([], context, [sync], n_probes=probes, base_teacher=True)
    return time.perf_counter() - start


def run(
    command: str,
    out: Path,
    *,
    quick: bool,
    model: str,
    device: str,
    threads: int | None,
    factors: list[str] | None = None,
    split: str = "test",
    overrides: dict[str, Any] | None = None,
    variants: dict[str, dict[str, Any]] | None = None,
    teachers: list[str] | None = None,
    long: bool = False,
    sessions: int | None = None,
) -> list[Path]:
    """Run one subcommand (or `all`); returns the files written.

    `factors` limits the ablation grid; `split` picks the streaming benchmark's
    sessions (`dev` for tuning, `test` for reporting); `overrides` are its config changes,
    `variants` extra streaming rows (name -> further overrides) and `teachers` the
    `streaming_teacher`s streamed (default: both); `long` picks the ~4k-token
    sessions and `sessions` the split's first few.
    """
    from tqdm.auto import tqdm

    s = SETTINGS["quick" if quick else "full"]
    if factors:
        unknown = sorted(set(factors) - set(s["ablation"]))
        if unknown:
            raise SystemExit(f"--factors: unknown {unknown}; choose from {sorted(s['ablation'])}")
        s = {**s, "ablation": {k: v for k, v in s["ablation"].items() if k in factors}}
    written: list[Path] = []
    meta = {"command": command, "quick": quick, "model": model, "machine": _machine()}
    if command in ("streaming", "all"):
        written += _streaming(
            out,
            quick,
            model,
            device,
            threads,
            split,
            overrides or {},
            meta,
            variants,
            teachers,
            long=long,
            sessions=sessions,
        )
        if command == "streaming":
            return written
    load = _loader(model, device, threads)
    pm = load()
    dev, test = _conversations(s) if command != "latency" else ([], [])
    if command in ("fidelity", "all"):
        absorbing = sum(m.kind == "absorb" for m in METHODS)
        bar = tqdm(total=len(dev) * absorbing * len(s["lrs"]) + len(test) * len(METHODS), desc="fidelity", unit="run")
        result = fidelity_experiment(
            pm,
            dev,
            test,
            steps=s["steps"],
            lrs=s["lrs"],
            probes=s["probes"],
            max_new_tokens=s["max_new_tokens"],
            tick=_ticker(bar),
        )
        bar.close()
        table = markdown_table(
            result["rows"],
            ["method", "steps", "lr", "kl", "gap_closed", "recall", "seconds", "kl_generated", "kl_chitchat-dataset"],
        )
        written += write_outputs(out, "fidelity", {**meta, **result}, table, plot_fidelity)
    if command in ("latency", "all"):
        n, m = (64, 32) if quick else (256, 128)
        round_s = _round_seconds(pm, s["steps"], s["probes"], n, m)
        bar = tqdm(total=2 * len(s["lengths"]), desc="latency", unit="run")
        result = latency_experiment(
            pm,
            model,
            s["lengths"],
            window=s["window"],
            new_tokens=s["new_tokens"],
            round_seconds=round_s,
            absorb_tokens=n,
            tick=_ticker(bar),
        )
        bar.close()
        table = markdown_table(
            result["rows"],
            [
                "setting",
                "transcript_tokens",
                "prompt_tokens",
                "prefill_s",
                "ms_per_token",
                "kv_cache_mib",
                "peak_mib",
                "absorption_s_total",
                "absorption_ms_per_transcript_token",
                "beyond_trained_context",
            ],
        )
        written += write_outputs(out, "latency", {**meta, **result}, table, plot_latency)
    if command in ("ablations", "all"):
        conv = test[0]
        bar = tqdm(total=sum(len(v) for v in s["ablation"].values()), desc="ablations", unit="run")
        loaded = {16: pm}
        result = ablation_experiment(
            lambda r: loaded[r] if r in loaded else loaded.setdefault(r, load(r)),
            conv,
            grid=s["ablation"],
            steps=s["steps"],
            lr=1e-3,
            probes=s["probes"],
            max_new_tokens=s["max_new_tokens"],
            tick=_ticker(bar),
        )
        bar.close()
        table = markdown_table(
            result["points"],
            [
                "factor",
                "value",
                "kl",
                "kl_truncation",
                "gap_closed",
                "recall",
                "steps_run",
                "seconds",
                "context_messages",
                "sync_messages",
            ],
        )
        written += write_outputs(out, "ablations", {**meta, **result}, table, plot_ablations)
    return written


def _ticker(bar: Any) -> Any:
    """`tick(label)` as each run starts: counts the previous run done, shows the new one (close counts the last)."""
    started = [False]

    def tick(label: str) -> None:
        if started[0]:
            bar.update(1)
        started[0] = True
        bar.set_postfix_str(label[:60])

    original_close = bar.close

    def close() -> None:
        if started[0] and bar.n < bar.total:
            bar.update(1)
        original_close()

    bar.close = close
    return tick


def add_parser(sub: Any) -> None:
    """Register `bench` on the main CLI's subparsers."""
    bench = sub.add_parser("bench", help="run the benchmark suite (JSON + markdown + PNG per experiment)")
    bench.add_argument("experiment", choices=["fidelity", "latency", "ablations", "streaming", "all"])
    bench.add_argument("--quick", action="store_true", help="a few minutes on a 2-core CPU")
    bench.add_argument("--out", default="bench-results", help="output folder (default: bench-results)")
    bench.add_argument("--model", default="smollm2-135m-instruct", help="model name, HF id, path, or 'tiny'")
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    bench.add_argument(
        "--factors", nargs="+", default=None, help="ablations: run only these factors (e.g. update_penalty lora_rank)"
    )
    bench.add_argument(
        "--split",
        choices=["test", "dev"],
        default="test",
        help="streaming: reported sessions (test) or tuning sessions (dev)",
    )
    bench.add_argument(
        "--set",
        nargs="+",
        default=None,
        metavar="KEY=VALUE",
        help="streaming: AbsorberConfig overrides, e.g. --set probe_count=16 streaming_teacher=chained",
    )
    bench.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=None,
        metavar="NAME KEY=VALUE",
        help="streaming: one more streamed row, 'stream-NAME', with these overrides on top of --set "
        "(repeatable), e.g. --variant recite sync_recitation=after",
    )
    bench.add_argument(
        "--teachers",
        nargs="+",
        choices=["history", "chained"],
        default=None,
        help="streaming: which streaming_teacher rows to stream (default: both)",
    )
    bench.add_argument(
        "--long",
        action="store_true",
        help="streaming: ~4k-token sessions (12 real chats after the facts), window 1,280, rounds of 1,024 tokens",
    )
    bench.add_argument(
        "--sessions",
        type=int,
        default=None,
        metavar="K",
        help="streaming: only the split's first K sessions",
    )


def main(args: argparse.Namespace) -> int:
    paths = run(
        args.experiment,
        Path(args.out),
        quick=args.quick,
        model=args.model,
        device=args.device,
        threads=args.threads,
        factors=args.factors,
        split=args.split,
        overrides=parse_overrides(args.set),
        variants=parse_variants(args.variant),
        teachers=args.teachers,
        long=args.long,
        sessions=args.sessions,
    )
    print(json.dumps([str(p) for p in paths], indent=2))
    return 0
