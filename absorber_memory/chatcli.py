"""`absorber-memory chat`: talk to a persistent session; old turns are absorbed in the background.

Each line typed is a user turn, stored before the answer streams; the answer
is stored when it ends. After each answer one status line shows the window
(tokens / budget), messages absorbed, and absorption jobs (queued, or
running with step and loss). Slash commands: `/recall`, `/jobs`,
`/forget <message id>`, `/flush`, `/help`, `/quit`.

Leaving: `/quit` asks whether to wait for pending absorption (piped input
always waits, so scripts see finished jobs). Ctrl-D (end of input) leaves
like `/quit`. Ctrl-C while an answer streams stops that answer and keeps
the part already shown; Ctrl-C at the prompt leaves at once. Nothing is lost
either way: messages are stored as they are typed, and jobs left pending
resume the next time the data directory is opened.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

HELP = "commands: /recall  /jobs  /forget <message id>  /flush  /help  /quit"


def status_line(memory: Any, session_id: str) -> str:
    """`[window 120/512 tokens | 6 absorbed | jobs: 1 queued, 1 running (step 12, loss 0.081)]`."""
    rows = memory.transcript(session_id)
    jobs = memory.jobs(session_id)
    queued = sum(str(j.status) == "queued" for j in jobs)
    running = [j for j in jobs if str(j.status) == "running"]
    parts = [f"{queued} queued"] if queued else []
    for j in running:
        loss = f", loss {j.loss:.3f}" if j.loss is not None else ""
        parts.append(f"1 running (step {j.step or 0}{loss})")
    return (
        f"[window {memory.window_tokens(session_id)}/{memory.config.window_tokens} tokens | "
        f"{sum(m.absorbed for m in rows)} absorbed | jobs: {', '.join(parts) or 'none pending'}]"
    )


class ChatLoop:
    """The read-answer loop over `stdin`/`stdout`; `interactive` when a person types (prompts and questions)."""

    def __init__(
        self,
        memory: Any,
        session_id: str,
        user_id: str | None,
        stdin: TextIO,
        stdout: TextIO,
        *,
        interactive: bool,
        max_new_tokens: int | None = None,
    ) -> None:
        self.memory, self.session_id, self.user_id = memory, session_id, user_id
        self.stdin, self.stdout, self.interactive = stdin, stdout, interactive
        self.max_new_tokens = max_new_tokens

    def say(self, text: str = "", end: str = "\n") -> None:
        self.stdout.write(text + end)
        self.stdout.flush()

    def run(self) -> int:
        self.say(f"session {self.session_id!r}: {len(self.memory.transcript(self.session_id))} stored messages. {HELP}")
        while True:
            try:
                if self.interactive:
                    self.say("you> ", end="")
                line = self.stdin.readline()
            except KeyboardInterrupt:
                self.say("\n(leaving; pending absorption resumes next time)")
                return 0
            if not line:  # Ctrl-D / end of piped input
                if self.interactive:
                    self.say()
                return self.leave()
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if self.command(text):
                    return self.leave()
                continue
            self.answer(text)

    def answer(self, text: str) -> None:
        self.memory.add_message("user", text, session_id=self.session_id, user_id=self.user_id)
        stream = self.memory.stream(session_id=self.session_id, max_new_tokens=self.max_new_tokens)
        pieces: list[str] = []
        self.say("ai> ", end="")
        try:
            for piece in stream:
                pieces.append(piece)
                self.say(piece, end="")
        except KeyboardInterrupt:
            stream.close()
            self.say(" [stopped]", end="")
        reply = "".join(pieces).strip()
        self.say()
        if reply:
            self.memory.add_message("assistant", reply, session_id=self.session_id, user_id=self.user_id)
        self.say(status_line(self.memory, self.session_id))

    def command(self, text: str) -> bool:
        """Run a slash command; True means leave."""
        name, _, arg = text.partition(" ")
        if name == "/quit":
            return True
        if name == "/help":
            self.say(HELP)
        elif name == "/recall":
            for r in self.memory.recall(self.session_id):
                self.say(f"Q: {r.question}\n  with the adapter: {r.absorbed}\n  base model:       {r.base}")
        elif name == "/jobs":
            jobs = self.memory.jobs(self.session_id)
            for j in jobs:
                curve = (j.metrics or {}).get("loss_curve") or []
                loss = f"loss {curve[0]:.3f} -> {curve[-1]:.3f}" if curve else (f"loss {j.loss:.3f}" if j.loss else "")
                self.say(f"job {j.id}: {j.status}, messages {j.message_ids} {loss} {j.error or ''}".rstrip())
            if not jobs:
                self.say("no absorption jobs yet")
        elif name == "/forget":
            if not arg.strip().isdigit():
                self.say("usage: /forget <message id>  (ids: `absorber-memory show SESSION`)")
                return False
            self.memory.forget_messages(self.session_id, [int(arg)])
            self.say(f"forgot message {arg}; the adapter is rebuilt without it in the background")
        elif name == "/flush":
            done = self.memory.flush(self.session_id)
            self.say(f"{len(done)} job(s) finished. {status_line(self.memory, self.session_id)}")
        else:
            self.say(f"unknown command {name!r}. {HELP}")
        return False

    def leave(self) -> int:
        pending = [j for j in self.memory.jobs(self.session_id) if j.pending]
        if pending:
            wait = True
            if self.interactive:
                self.say(f"wait for {len(pending)} pending absorption job(s)? [Y/n] ", end="")
                try:
                    wait = self.stdin.readline().strip().lower() not in ("n", "no")
                except KeyboardInterrupt:
                    wait = False
            if wait:
                self.say(f"waiting for {len(pending)} absorption job(s) ...")
                self.memory.flush(self.session_id)
                self.say(status_line(self.memory, self.session_id))
            else:
                self.say("leaving; pending absorption resumes the next time this data directory is opened")
        return 0


def run_chat(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    from .commands import open_memory

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    window = {} if args.window_tokens is None else {"window_tokens": args.window_tokens}
    if window:  # a smaller window absorbs sooner; a round takes at most what the window holds
        window["absorb_tokens"] = min(256, args.window_tokens)
    memory = open_memory(args, **window)
    try:
        if args.system:
            memory.set_prefix(args.session, args.system)
        loop = ChatLoop(
            memory,
            args.session,
            args.user,
            stdin,
            stdout,
            interactive=stdin.isatty(),
            max_new_tokens=args.max_new_tokens,
        )
        return loop.run()
    finally:
        memory.close()


def add_parser(sub: Any) -> None:
    p = sub.add_parser("chat", help="chat on a persistent session; old turns are absorbed in the background")
    p.add_argument("--session", default="default", help="session id (default: 'default')")
    p.add_argument("--user", default=None, help="owner of the session, for forget-user")
    p.add_argument("--system", default=None, help="system prompt (the session's prefix)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model name, Hugging Face id or path")
    p.add_argument("--home", default=None, help="data directory (default: $ABSORBER_HOME)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="longest answer (default: the config's)")
    p.add_argument(
        "--window-tokens", type=int, default=None, help="recent turns kept in the prompt, in tokens (default 512)"
    )
