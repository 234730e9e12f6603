"""`absorber-memory chat` through piped stdin and through a pseudo-terminal, on the tiny model."""

from __future__ import annotations

import io
import json
import os
import sys

import pytest

from absorber_memory.cli import main

SMALL = ["--model", "tiny", "--max-new-tokens", "4"]


def chat(monkeypatch, capsys, home, lines, *extra):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    code = main(["chat", "--home", str(home), *SMALL, *extra])
    return code, capsys.readouterr().out


def test_piped_chat_stores_turns_absorbs_and_runs_slash_commands(monkeypatch, capsys, tmp_path):
    from absorber_memory import commands

    monkeypatch.setattr(commands, "open_memory", small_window(commands.open_memory))
    home = tmp_path / "home"
    lines = [f"My name is Ana and fact number {i} is true." for i in range(6)]
    code, out = chat(monkeypatch, capsys, home, [*lines, "/jobs", "/flush", "/recall", "/nonsense", "/forget x"],
                     "--session", "s", "--user", "u", "--system", "Be brief.")
    assert code == 0
    assert out.count("ai> ") == 6 and out.count("[window ") >= 6
    assert "job 1:" in out and "job(s) finished" in out
    assert "with the adapter:" in out and "base model:" in out
    assert "unknown command '/nonsense'" in out and "usage: /forget <message id>" in out
    shown = json.loads(run_json(capsys, home, "show", "s"))
    users = [m for m in shown["messages"] if m["role"] == "user"]
    assert [m["content"] for m in users] == lines  # every typed line stored, in order
    assert shown["messages"][0] == {**shown["messages"][0], "role": "system", "content": "Be brief."}
    assert shown["absorbed"] > 0 and shown["user"] == "u"

    first = users[0]["id"]
    code, out = chat(monkeypatch, capsys, home, [f"/forget {first}", "/quit"], "--session", "s")
    assert code == 0 and f"forgot message {first}" in out and "waiting for" in out  # piped /quit waits
    assert first not in [m["id"] for m in json.loads(run_json(capsys, home, "show", "s"))["messages"]]


def small_window(open_memory):
    def opened(args, **config):
        return open_memory(args, window_tokens=60, absorb_tokens=30, sync_tokens=30, max_steps=3, probe_count=1,
                           probe_max_new_tokens=4)
    return opened


def run_json(capsys, home, *argv):
    assert main([*argv, "--home", str(home), "--model", "tiny", "--json"]) == 0
    return capsys.readouterr().out


def test_chat_reports_a_bad_model_or_session_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert main(["chat", "--home", str(tmp_path), "--model", "./no/such/model"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no such folder" in err
    assert main(["chat", "--home", str(tmp_path), "--model", "tiny", "--session", ""]) == 2
    assert "`session_id` must be 1-1024 characters" in capsys.readouterr().err
    for bad in ("0", "-5"):
        assert main(["chat", "--home", str(tmp_path), "--model", "tiny", "--window-tokens", bad]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "window_tokens" in err


def test_chat_window_tokens_makes_absorption_start_sooner(monkeypatch, capsys, tmp_path):
    lines = "".join(f"my fact number {i} is that I like the colour {i}\n" for i in range(4)) + "/flush\n/quit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    argv = ["chat", "--home", str(tmp_path), "--model", "tiny", "--max-new-tokens", "4", "--window-tokens", "40"]
    assert main(argv) == 0
    capsys.readouterr()
    from absorber_memory.commands import open_memory

    memory = open_memory(type("Args", (), {"home": str(tmp_path), "model": "tiny"})())
    try:
        assert any(m.absorbed for m in memory.transcript("default"))
    finally:
        memory.close()


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a POSIX pseudo-terminal")
def test_chat_in_a_terminal_prompts_and_leaves_on_ctrl_d(tmp_path):
    import pty
    import select
    import subprocess
    import time

    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "absorber_memory", "chat", "--home", str(tmp_path), *SMALL],
                            stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    seen = b""

    def read_until(marker: bytes, timeout: float = 120) -> None:
        nonlocal seen
        end = time.monotonic() + timeout
        while marker not in seen and time.monotonic() < end:
            if select.select([leader], [], [], 1)[0]:
                try:
                    seen += os.read(leader, 4096)
                except OSError:
                    break
        assert marker in seen, seen[-500:]

    read_until(b"you> ")
    os.write(leader, b"Hello there\n")
    read_until(b"[window ")
    os.write(leader, b"\x04")  # Ctrl-D
    assert proc.wait(timeout=120) == 0
    os.close(leader)
    assert b"ai> " in seen
