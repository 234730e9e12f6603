"""Command line: `absorber-memory chat | demo | bench | info | sessions | show | absorb | recall | forget | export`.

`demo` runs the scripted absorption demo on the default model (see
`demo.py`); `bench` runs the benchmark suite (see `bench/`); `info` prints
where data lives and what the runtime will use; `chat` talks to a persistent
session (see `chatcli.py`); the housekeeping commands
(`sessions`, `show`, `absorb`, `recall`, `forget`, `forget-user`, `export`)
read and change a data directory (see `commands.py`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _info() -> int:
    import torch

    from .errors import ModelLoadError
    from .models import DEFAULT_MODEL, absorber_home, embedded_gguf_path, resolve_device

    try:
        gguf = str(embedded_gguf_path())
    except ModelLoadError as exc:
        gguf = f"missing ({exc})"
    info = {
        "data directory ($ABSORBER_HOME)": str(absorber_home()),
        "default model": DEFAULT_MODEL,
        "default model file": gguf,
        "device (auto)": str(resolve_device("auto")),
        "torch": torch.__version__,
        "torch threads": torch.get_num_threads(),
    }
    print(json.dumps(info, indent=2))
    return 0


def _quiet_libraries() -> None:
    """Hide other libraries' loading bars and deprecation chatter; the CLI shows its own progress.

    Done here, not on import: a library must not change process-wide logging.
    """
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="absorber-memory", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log absorption details")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="stream a chat through the memory, absorb it in the background, test recall")
    demo.add_argument("--model", default=None, help="model name, Hugging Face id or path")
    demo.add_argument("--max-steps", type=int, default=None, help="optimizer steps per absorption")
    demo.add_argument("--device", default=None, help="auto, cpu, cuda, ...")
    demo.add_argument("--json", default=None, help="also write the figures to this JSON file (and a PNG beside it)")
    sub.add_parser("info", help="show data directory, device and default model file")
    from .bench.cli import add_parser
    from .chatcli import add_parser as add_chat_parser
    from .commands import COMMANDS, add_parsers, run_command

    add_parser(sub)
    add_chat_parser(sub)
    add_parsers(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    _quiet_libraries()

    if args.command == "info":
        return _info()
    from .errors import AbsorberError

    if args.command in (*COMMANDS, "chat"):
        from .chatcli import run_chat

        try:
            return run_chat(args) if args.command == "chat" else run_command(args)
        except AbsorberError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.command == "bench":
        from .bench.cli import main as bench_main

        return bench_main(args)
    from .demo import run_demo

    overrides = {k: v for k, v in (("max_steps", args.max_steps), ("device", args.device)) if v is not None}
    try:
        figure = None if args.json is None else Path(args.json).with_suffix(".png")
        result = run_demo(args.model, figure=figure, **overrides)
    except AbsorberError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
