"""Housekeeping from the terminal: list, show, absorb, consolidate, recall, forget and export sessions.

Each command opens the data directory (`--home`, else `$ABSORBER_HOME`)
with the base model it was made with (`--model`, default the embedded one),
does one thing and exits; listings print a table, or JSON with `--json`.
Errors print one line, `error: ...`, and exit with status 2; nothing stored
is changed by a command that fails.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .errors import AbsorberError, InvalidMessageError, InvalidSessionError
from .models import DEFAULT_MODEL


def open_memory(args: argparse.Namespace, **config: Any) -> Any:
    """The `AbsorberMemory` of `--home` (else `$ABSORBER_HOME`) on `--model` ("tiny": the in-process test model)."""
    from .sessions import AbsorberMemory

    home = Path(args.home).expanduser() if args.home else None
    if args.model == "tiny":
        from .testing import tiny_model_and_tokenizer

        model, tokenizer = tiny_model_and_tokenizer()
        return AbsorberMemory(model, tokenizer=tokenizer, data_dir=home, config=config or None)
    return AbsorberMemory(args.model, data_dir=home, config=config or None)


def known_session(memory: Any, session_id: str) -> str:
    """`session_id` if the memory has it, else `InvalidSessionError` naming the known ones (a few)."""
    known = memory.sessions()
    if session_id not in known:
        shown = ", ".join(repr(s) for s in known[:5]) + (", ..." if len(known) > 5 else "")
        raise InvalidSessionError(f"unknown session {session_id!r}; known: {shown or 'none'}")
    return session_id


def _size(folder: Path | None) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder else 0


def session_summary(memory: Any, session_id: str) -> dict[str, Any]:
    """One row of `sessions`: owner, message counts, adapter version and size, last activity."""
    rows = memory.transcript(session_id)
    row = memory.store.session(session_id)
    adapter = memory.adapter_path(session_id)
    jobs = memory.jobs(session_id)
    times = [m.created for m in rows if m.created] + [t for j in jobs for t in (j.created, j.finished) if t]
    return {
        "session": session_id,
        "user": row.user_id if row else None,
        "messages": sum(m.role != "system" for m in rows),
        "absorbed": sum(m.absorbed for m in rows),
        "adapter_version": row.adapter_version if row else None,
        "adapter_bytes": _size(adapter),
        "jobs_pending": sum(j.pending for j in jobs),
        "last_activity": max(times) if times else None,
    }


def show_session(memory: Any, session_id: str) -> dict[str, Any]:
    """`show`: the transcript with absorbed / window marks and ids, adapter versions, jobs with loss curves."""
    known_session(memory, session_id)
    return {
        **session_summary(memory, session_id),
        "messages": [
            {"id": m.id, "role": m.role, "absorbed_in": m.absorbed_version, "content": m.content}
            for m in memory.transcript(session_id)
        ],
        "jobs": [
            {
                "id": j.id,
                "kind": j.kind,
                "status": str(j.status),
                "messages": j.message_ids,
                "adapter_version": j.adapter_version,
                "error": j.error,
                "loss_curve": (j.metrics or {}).get("loss_curve", []),
                "seconds": (j.metrics or {}).get("seconds"),
            }
            for j in memory.jobs(session_id)
        ],
    }


def read_messages(path: Path) -> list[dict[str, Any]]:
    """Messages from a file: JSONL or a JSON list of `{role, content}`, else plain text (one user turn per paragraph).

    Raises `InvalidMessageError` naming the file (and the line, for JSONL).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidMessageError(f"cannot read {path}: {exc}") from None
    stripped = text.strip()
    if not stripped:
        raise InvalidMessageError(f"{path} is empty")
    if stripped.startswith("["):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise InvalidMessageError(f"{path} is not a valid JSON list: {exc}") from None
        return list(data) if isinstance(data, list) else [data]
    if stripped.startswith("{"):
        messages = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                messages.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InvalidMessageError(f"{path}, line {number}: not a JSON object ({exc.msg})") from None
        return messages
    paragraphs = [p.strip() for p in stripped.split("\n\n") if p.strip()]
    return [{"role": "user", "content": p} for p in paragraphs]


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c)).ljust(widths[c]) for c in columns))


def run_command(args: argparse.Namespace) -> int:
    """Run one housekeeping subcommand; returns the exit status."""
    memory = open_memory(args)
    try:
        return _dispatch(memory, args)
    finally:
        memory.close()


def _dispatch(memory: Any, args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "sessions":
        rows = [session_summary(memory, s) for s in memory.sessions(args.user)]
        if args.json:
            print(json.dumps(rows, indent=2))
        elif rows:
            _print_table(rows, ["session", "user", "messages", "absorbed", "adapter_version", "adapter_bytes"])
        else:
            print("no sessions")
        return 0
    if cmd == "show":
        shown = show_session(memory, args.session)
        if args.json:
            print(json.dumps(shown, indent=2))
            return 0
        print(
            f"session {args.session}: {shown['absorbed']} of {shown['messages']} messages absorbed, "
            f"adapter v{shown['adapter_version']}"
        )
        for m in shown["messages"]:
            mark = f"[absorbed v{m['absorbed_in']}]" if m["absorbed_in"] else "[window]"
            print(f"{m['id']:>6} {mark:<16} {m['role']}: {m['content']}")
        for j in shown["jobs"]:
            curve = j["loss_curve"]
            loss = f"loss {curve[0]:.3f} -> {curve[-1]:.3f}" if curve else ""
            what = "consolidation" if j["kind"] == "consolidation" else f"{len(j['messages'])} messages"
            print(f"job {j['id']}: {j['status']}, {what} {loss} {j['error'] or ''}".rstrip())
        return 0
    if cmd == "absorb":
        messages = read_messages(Path(args.file))
        handles = memory.absorb_messages(messages, session_id=args.session, user_id=args.user)
        jobs = memory.flush(args.session) if not args.no_wait else []
        result = {"session": args.session, "messages": len(messages), "jobs": [h.id for h in handles]}
        result["failed"] = [j.error for j in jobs if str(j.status) == "failed"]
        print(json.dumps(result) if args.json else f"absorbed {len(messages)} messages into session {args.session}")
        return 1 if result["failed"] else 0
    if cmd == "consolidate":
        handle = memory.consolidate(known_session(memory, args.session))
        info = handle.result() if handle is not None and not args.no_wait else None
        result = {
            "session": args.session,
            "job": None if handle is None else handle.id,
            "status": None if handle is None else str(info.status if info else "queued"),
            "error": info.error if info else None,
        }
        if args.json:
            print(json.dumps(result))
        elif handle is None:
            print(f"session {args.session}: nothing absorbed yet, nothing to consolidate")
        else:
            print(f"session {args.session}: consolidation job {handle.id} {result['status']} {result['error'] or ''}")
        return 1 if result["status"] in ("failed", "cancelled") else 0
    if cmd == "recall":
        rows = [r.to_dict() for r in memory.recall(known_session(memory, args.session), args.question)]
        if args.json:
            print(json.dumps(rows, indent=2))
        for r in [] if args.json else rows:
            print(f"Q: {r['question']}\n  with the adapter: {r['absorbed']}\n  base model:       {r['base']}")
        return 0
    if cmd == "forget":
        known_session(memory, args.session)
        if args.messages:
            memory.forget_messages(args.session, args.messages)
            memory.flush(args.session)
            done = {"session": args.session, "forgotten_messages": args.messages}
        else:
            done = {"session": args.session, "forgotten": memory.forget(args.session)}
        print(json.dumps(done) if args.json else f"forgot {done}")
        return 0
    if cmd == "forget-user":
        gone = memory.forget_user(args.user_id)
        print(json.dumps({"user": args.user_id, "sessions": gone}) if args.json else f"forgot sessions {gone}")
        return 0
    if cmd == "export":
        known_session(memory, args.session)
        path = memory.export_adapter(
            args.session, Path(args.directory), base_model_name=args.base_model_name, transcript=not args.no_transcript
        )
        print(json.dumps({"session": args.session, "directory": str(path)}) if args.json else f"exported to {path}")
        return 0
    raise AbsorberError(f"unknown command {cmd!r}")


def add_parsers(sub: Any) -> None:
    """The housekeeping subcommands, on `absorber-memory`'s subparsers."""

    def command(name: str, help: str, *, listing: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--home", default=None, help="data directory (default: $ABSORBER_HOME)")
        p.add_argument("--model", default=DEFAULT_MODEL, help="base model the data was made with")
        if listing:
            p.add_argument("--json", action="store_true", help="print JSON")
        return p

    command("sessions", "list sessions").add_argument("--user", default=None, help="only this user's sessions")
    command("show", "a session's transcript, adapter versions and jobs").add_argument("session")
    p = command("absorb", "absorb a file (JSONL, JSON list, or plain text paragraphs) into a session")
    p.add_argument("file")
    p.add_argument("--session", required=True)
    p.add_argument("--user", default=None, help="owner of the session")
    p.add_argument("--no-wait", action="store_true", help="queue the absorption and exit")
    p = command("consolidate", "re-teach a session's adapter everything it has absorbed, in one round")
    p.add_argument("session")
    p.add_argument("--no-wait", action="store_true", help="queue it and exit (it runs the next time the data opens)")
    p = command("recall", "what a session's adapter alone holds, beside the base model")
    p.add_argument("session")
    p.add_argument("--question", action="append", default=None, help="ask this instead (repeatable)")
    p = command("forget", "forget a session, or some of its messages")
    p.add_argument("session")
    p.add_argument("--messages", type=int, nargs="+", default=None, metavar="ID", help="only these message ids")
    command("forget-user", "forget every session of a user").add_argument("user_id")
    p = command("export", "write a session's adapter as a PEFT folder (+ manifest, transcript) into an empty directory")
    p.add_argument("session")
    p.add_argument("directory")
    p.add_argument("--base-model-name", help="the model name given to `vllm serve` (its filesystem resolver checks it)")
    p.add_argument("--no-transcript", action="store_true", help="leave the conversation out (for a serving host)")


COMMANDS = ("sessions", "show", "absorb", "consolidate", "recall", "forget", "forget-user", "export")
