"""Benchmark outputs: raw JSON, a markdown table and a PNG plot per subcommand.

matplotlib (the `bench` extra) is imported only when plotting, with the
non-interactive Agg backend, so a headless CI machine can run `--quick`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, name: str, result: dict[str, Any], table: str, plot: Any) -> list[Path]:
    """Write `<name>.json`, `<name>.md` and `<name>.png` (via `plot(result, path)`); returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"]
    paths[0].write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    paths[1].write_text(table, encoding="utf-8")
    plot(result, paths[2])
    return paths


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fidelity(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    rows = [r for r in result["rows"] if r["method"] != "full"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["method"] for r in rows]
    axes[0].barh(names, [r["gap_closed"] or 0.0 for r in rows], color="tab:blue")
    axes[0].axvline(0, color="black", linewidth=0.8)
    axes[0].set_xlabel("gap closed vs truncation (1 = as good as full context)")
    axes[1].barh(names, [r["recall"] if r["recall"] is not None else 0.0 for r in rows], color="tab:green")
    axes[1].set_xlabel("keyword recall of stated facts")
    fig.suptitle(f"Fidelity on held-out queries, {result['settings']['steps']} steps per absorbing method")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for setting, style in (("full context", "o-"), ("absorber", "s-")):
        rows = [r for r in result["rows"] if r["setting"] == setting]
        xs = [r["transcript_tokens"] for r in rows]
        axes[0].plot(xs, [r["ms_per_token"] for r in rows], style, label=f"{setting}: decode")
        axes[1].plot(xs, [r["kv_cache_mib"] for r in rows], style, label=setting)
    for ax, label in ((axes[0], "ms per generated token"), (axes[1], "KV cache (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("transcript tokens")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ablations(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    factors = list(dict.fromkeys(p["factor"] for p in result["points"]))
    fig, axes = plt.subplots(1, len(factors), figsize=(3.2 * len(factors), 3.4), squeeze=False)
    for ax, factor in zip(axes[0], factors, strict=False):
        points = [p for p in result["points"] if p["factor"] == factor]
        ax.bar([str(p["value"]) for p in points], [p["gap_closed"] for p in points], color="tab:purple")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(factor)
        ax.tick_params(axis="x", rotation=30)
    axes[0][0].set_ylabel("gap closed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
