"""Fidelity vs. cost of every absorbing method in saved `bench streaming` results, as one figure and table.

Reads `streaming.json` files written by `absorber-memory bench streaming` (same split, any settings) and
plots, per absorbing row, KL gap closed and relative recall against seconds per absorbed token. Seconds
are only comparable between runs made on the same machine in the same conditions; each file's label
says which run a point comes from.

    python benchmarks/tradeoff_curve.py docs/bench/streaming/test.json docs/bench/streaming/test-recite.json \
        docs/bench/streaming/test-kl025.json --out docs/bench/streaming/tradeoff.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from absorber_memory.bench.report import _pyplot


def points(paths: list[Path]) -> list[dict]:
    """One point per absorbing row; a row rerun with the same result counts once (the first run's).

    Fidelity is deterministic, so the same name with the same KL is the same setting run again; the same
    name with another KL (e.g. `stream-history` under other `--set`s) is another point.
    """
    seen: dict[str, dict] = {}
    for path in paths:
        data = json.loads(path.read_text(encoding="utf-8"))
        for row in data["rows"]:
            if row.get("s_per_absorbed_token") is None:
                continue  # no absorption: full context, truncation, summary
            name = row["method"]
            key = f"{name} {row['kl']:.10g}"
            if key in seen:
                continue
            seen[key] = {
                "method": name,
                "run": path.stem,
                "s_per_token": row["s_per_absorbed_token"],
                "x_prefill_4k": row["x_prefill_4k"],
                "gap_closed": row["gap_closed"],
                "relative_recall": row["relative_recall"],  # None: the full-context model got nothing right
            }
    return sorted(seen.values(), key=lambda p: p["s_per_token"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = points(args.results)
    print("| method | run | s / absorbed token | x prefill at 4k | gap closed | relative recall |")
    print("| --- | --- | --- | --- | --- | --- |")
    for p in rows:
        print(
            f"| {p['method']} | {p['run']} | {p['s_per_token']:.2f} | {p['x_prefill_4k']:.0f} "
            f"| {p['gap_closed']:.3f} | {'n/a' if p['relative_recall'] is None else format(p['relative_recall'], '.2f')} |"
        )
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [p["s_per_token"] for p in rows]
    ax.scatter(xs, [p["gap_closed"] for p in rows], color="tab:blue", label="KL gap closed")
    scored = [p for p in rows if p["relative_recall"] is not None]
    if scored:
        ax.scatter([p["s_per_token"] for p in scored], [p["relative_recall"] for p in scored], color="tab:green",
                   marker="s", label="relative recall")
    names = [p["method"] for p in rows]
    for p in rows:
        label = p["method"] if names.count(p["method"]) == 1 else f"{p['method']} ({p['run']})"
        ax.annotate(label, (p["s_per_token"], p["gap_closed"]), fontsize=7)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("absorption seconds per absorbed token (2-core CPU)")
    ax.set_ylabel("fidelity")
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
