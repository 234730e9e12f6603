"""The fidelity-vs-baselines experiment and the ablations (paper Tables 2-7 in spirit).

Fairness: every absorbing method gets the same optimizer-step budget; its
learning rate is chosen on a small grid by pooled KL on *dev* conversations,
which are never among the reported *test* conversations. Held-out queries
are never probes or sync text. `gap_closed = 1 - KL_method / KL_truncation`,
pooled over all answer tokens of the test conversations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .data import Conversation
from .methods import METHODS, Method, references, run_method

Progress = Callable[[str], None]


def _pool(runs: list[dict[str, Any]]) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in runs)
    scored = sum(r["scored"] for r in runs)
    return {
        "kl": sum(r["kl_sum"] for r in runs) / tokens if tokens else float("nan"),
        "recall": sum(r["hits"] for r in runs) / scored if scored else None,
        "seconds": sum(r["seconds"] for r in runs) / len(runs),
    }


def fidelity_experiment(
    pm: Any,
    dev: list[Conversation],
    test: list[Conversation],
    *,
    steps: int,
    lrs: list[float],
    probes: int,
    max_new_tokens: int,
    tick: Progress,
) -> dict[str, Any]:
    """Tune each absorbing method's lr on `dev`, then run every method on `test` at `steps` steps."""
    refs = {c.name: references(pm, c, max_new_tokens) for c in dev + test}
    tuning: dict[str, dict[str, float]] = {}
    for method in (m for m in METHODS if m.kind == "absorb"):
        tuning[method.name] = {}
        for lr in lrs:
            runs = []
            for conv in dev:
                tick(f"tune {method.name} lr={lr:g} on {conv.name}")
                runs.append(
                    run_method(
                        pm,
                        method,
                        conv,
                        refs[conv.name],
                        steps=steps,
                        lr=lr,
                        probes=probes,
                        max_new_tokens=max_new_tokens,
                    )
                )
            tuning[method.name][f"{lr:g}"] = _pool(runs)["kl"]
    chosen = {name: float(min(grid, key=grid.__getitem__)) for name, grid in tuning.items()}
    raw: dict[str, list[dict[str, Any]]] = {}
    for method in METHODS:
        raw[method.name] = []
        for conv in test:
            tick(f"test {method.name} on {conv.name}")
            result = run_method(
                pm,
                method,
                conv,
                refs[conv.name],
                steps=steps,
                lr=chosen.get(method.name, 0.0),
                probes=probes,
                max_new_tokens=max_new_tokens,
            )
            raw[method.name].append({"conversation": conv.name, "source": conv.source, **result})
    rows = _rows(raw, chosen, steps)
    return {
        "settings": {
            "steps": steps,
            "lrs": lrs,
            "probes": probes,
            "max_new_tokens": max_new_tokens,
            "dev": [c.name for c in dev],
            "test": [c.name for c in test],
        },
        "tuning_kl": tuning,
        "chosen_lr": chosen,
        "rows": rows,
        "raw": raw,
        "references": {name: [r.answer for r in rs] for name, rs in refs.items()},
    }


def _rows(raw: dict[str, list[dict[str, Any]]], chosen: dict[str, float], steps: int) -> list[dict[str, Any]]:
    base = _pool(raw["truncation"])["kl"]
    rows = []
    for method in METHODS:
        pooled = _pool(raw[method.name])
        by_source = {
            src: _pool([r for r in raw[method.name] if r["source"] == src])["kl"]
            for src in sorted({r["source"] for r in raw[method.name]})
        }
        rows.append(
            {
                "method": method.name,
                "steps": steps if method.kind == "absorb" else 0,
                "lr": chosen.get(method.name),
                "kl": pooled["kl"],
                "gap_closed": 1.0 - pooled["kl"] / base if base > 0 else None,
                "recall": pooled["recall"],
                "seconds": pooled["seconds"],
                **{f"kl_{src}": kl for src, kl in by_source.items()},
            }
        )
    return rows


ABLATION_METHOD = Method("sync-l1+probes", "absorb", "l1", True)


def ablation_experiment(
    pm_for_rank: Callable[[int], Any],
    conv: Conversation,
    *,
    grid: dict[str, list[Any]],
    steps: int,
    lr: float,
    probes: int,
    max_new_tokens: int,
    tick: Progress,
) -> dict[str, Any]:
    """Vary one factor at a time around the defaults (hidden-state L1 + probes) and score each point."""
    pm = pm_for_rank(grid["lora_rank"][0] if "lora_rank" in grid else 16)
    refs = references(pm, conv, max_new_tokens)
    base = _truncation_kl(pm, conv, refs, max_new_tokens)
    points = []
    for factor, values in grid.items():
        for value in values:
            tick(f"ablation {factor}={value}")
            point_pm, overrides, case, sync = pm, {}, conv, None
            if factor == "lora_rank":
                point_pm = pm_for_rank(value)
            elif factor == "absorb_turns":  # absorb the first n messages of C; the rest stays in the window
                case = Conversation(
                    conv.name,
                    conv.source,
                    conv.context[:value],
                    conv.context[value:] + conv.window,
                    conv.queries,
                    conv.keywords,
                    conv.prefix,
                )
            elif factor == "sync_tokens":
                sync = capped(pm, conv.window, value)
            elif factor == "update_penalty":
                overrides = {"update_penalty": value[0], "update_penalty_weight": value[1]}
            elif factor == "loss_threshold":
                overrides = {"loss_threshold": value}
            run_steps = value if factor == "steps" else (steps * 3 if factor == "loss_threshold" else steps)
            case_refs = refs if case is conv else references(point_pm, case, max_new_tokens)
            case_base = base if case is conv else _truncation_kl(point_pm, case, case_refs, max_new_tokens)
            result = run_method(
                point_pm,
                ABLATION_METHOD,
                case,
                case_refs,
                steps=run_steps,
                lr=lr,
                probes=probes,
                max_new_tokens=max_new_tokens,
                overrides=overrides,
                sync=sync,
            )
            kl = result["kl_sum"] / result["tokens"]
            points.append(
                {
                    "factor": factor,
                    "value": value if not isinstance(value, tuple) else list(value),
                    "kl": kl,
                    "kl_truncation": case_base,
                    "gap_closed": 1 - kl / case_base,
                    "recall": result["hits"] / result["scored"] if result["scored"] else None,
                    "steps_run": result.get("steps"),
                    "seconds": result["seconds"],
                    "context_messages": len(case.context),
                    "sync_messages": len(case.window if sync is None else sync),
                }
            )
    return {
        "settings": {
            "conversation": conv.name,
            "steps": steps,
            "lr": lr,
            "probes": probes,
            "method": ABLATION_METHOD.name,
        },
        "points": points,
    }


def _truncation_kl(pm: Any, conv: Conversation, refs: list[Any], max_new_tokens: int) -> float:
    r = run_method(
        pm, Method("truncation", "prompt"), conv, refs, steps=0, lr=0.0, probes=0, max_new_tokens=max_new_tokens
    )
    return r["kl_sum"] / r["tokens"]


def capped(pm: Any, messages: list[dict[str, str]], tokens: int) -> list[dict[str, str]]:
    """The leading whole messages that fit in `tokens`."""
    kept, used = [], 0
    for message in messages:
        used += pm.fmt.count(message)
        if used > tokens:
            break
        kept.append(message)
    return kept
