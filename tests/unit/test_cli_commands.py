"""The housekeeping commands on the tiny model: sessions, show, absorb, consolidate, recall, forget, forget-user, export."""

from __future__ import annotations

import json

import pytest

from absorber_memory.cli import main


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


def run(capsys, home, *argv):
    code = main([*argv, "--home", str(home), "--model", "tiny"])
    out, err = capsys.readouterr()
    return code, out, err


def write_jsonl(path, messages):
    path.write_text("".join(json.dumps(m) + "\n" for m in messages))
    return path


CHAT = [{"role": "user", "content": "My name is Ana and I live in Lisbon."},
        {"role": "assistant", "content": "Nice to meet you, Ana."},
        {"role": "user", "content": "My dog is called Bruno."},
        {"role": "assistant", "content": "Bruno is a good name."}]


def test_absorb_show_sessions_recall_export_forget_round_trip(capsys, home, tmp_path):
    code, out, err = run(capsys, home, "absorb", str(write_jsonl(tmp_path / "chat.jsonl", CHAT)), "--session", "ana",
                         "--user", "u1", "--json")
    assert code == 0, err
    assert json.loads(out)["messages"] == 4 and json.loads(out)["failed"] == []
    text = tmp_path / "notes.txt"
    text.write_text("I like tea.\n\nI was born in 1990.\n")
    assert run(capsys, home, "absorb", str(text), "--session", "bo")[0] == 0

    code, out, _ = run(capsys, home, "sessions", "--json")
    rows = {r["session"]: r for r in json.loads(out)}
    assert code == 0 and set(rows) == {"ana", "bo"}
    assert rows["ana"]["user"] == "u1" and rows["ana"]["messages"] == 4 and rows["ana"]["absorbed"] == 4
    assert rows["ana"]["adapter_version"] >= 1 and rows["ana"]["adapter_bytes"] > 0
    assert rows["bo"]["messages"] == 2  # one user turn per paragraph
    assert json.loads(run(capsys, home, "sessions", "--user", "u1", "--json")[1])[0]["session"] == "ana"
    assert "ana" in run(capsys, home, "sessions")[1]

    code, out, _ = run(capsys, home, "show", "ana", "--json")
    shown = json.loads(out)
    assert [m["content"] for m in shown["messages"]] == [m["content"] for m in CHAT]
    assert all(m["absorbed_in"] for m in shown["messages"])
    assert shown["jobs"] and all(j["status"] == "done" and j["loss_curve"] for j in shown["jobs"])
    assert "[absorbed v" in run(capsys, home, "show", "ana")[1]

    code, out, _ = run(capsys, home, "consolidate", "ana", "--json")
    done = json.loads(out)
    assert code == 0 and done["status"] == "done" and done["error"] is None
    after = json.loads(run(capsys, home, "show", "ana", "--json")[1])
    assert after["jobs"][-1]["id"] == done["job"] and after["jobs"][-1]["kind"] == "consolidation"
    assert after["messages"] == shown["messages"]  # nothing new absorbed, nothing lost
    assert after["adapter_version"] > shown["adapter_version"]
    assert "consolidation" in run(capsys, home, "show", "ana")[1]
    code, out, _ = run(capsys, home, "consolidate", "ana", "--no-wait")
    assert code == 0 and "queued" in out

    code, out, _ = run(capsys, home, "recall", "ana", "--question", "Who am I?", "--json")
    (row,) = json.loads(out)
    assert code == 0 and row["question"] == "Who am I?" and row["absorbed"] != row["base"]

    code, out, _ = run(capsys, home, "export", "ana", str(tmp_path / "out"), "--json")
    assert code == 0
    manifest = json.loads((tmp_path / "out" / "absorber-manifest.json").read_text())
    assert manifest["rank"] == 16 and manifest["absorbed_message_ids"] == [m["id"] for m in shown["messages"]]
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert len((tmp_path / "out" / "transcript.jsonl").read_text().splitlines()) == 4

    first = shown["messages"][0]["id"]
    assert run(capsys, home, "forget", "ana", "--messages", str(first))[0] == 0
    remaining = json.loads(run(capsys, home, "show", "ana", "--json")[1])["messages"]
    assert [m["id"] for m in remaining] == [m["id"] for m in shown["messages"][1:]]
    code, out, _ = run(capsys, home, "forget-user", "u1", "--json")
    assert json.loads(out)["sessions"] == ["ana"]
    assert run(capsys, home, "forget", "bo", "--json")[0] == 0
    assert json.loads(run(capsys, home, "sessions", "--json")[1]) == []


def test_bad_input_exits_non_zero_with_one_line_and_changes_nothing(capsys, home, tmp_path):
    assert run(capsys, home, "absorb", str(write_jsonl(tmp_path / "a.jsonl", CHAT)), "--session", "ana")[0] == 0
    before = json.loads(run(capsys, home, "show", "ana", "--json")[1])

    def fails(*argv, match):
        code, out, err = run(capsys, home, *argv)
        assert code == 2 and out == "", (code, out, err)
        assert len(err.strip().splitlines()) == 1 and match in err, err

    fails("show", "nobody", match="unknown session 'nobody'; known: 'ana'")
    fails("recall", "nobody", match="unknown session 'nobody'")
    fails("export", "nobody", str(tmp_path / "x"), match="unknown session")
    fails("forget", "nobody", match="unknown session")
    fails("consolidate", "nobody", match="unknown session 'nobody'; known: 'ana'")
    fails("absorb", str(tmp_path / "missing.jsonl"), "--session", "ana", match="cannot read")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CHAT[0]) + "\n" + "{not json\n")
    fails("absorb", str(bad), "--session", "ana", match="line 2: not a JSON object")
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"role": "wizard", "content": "hi"}])
    fails("absorb", str(wrong), "--session", "ana", match="got 'wizard'")
    (tmp_path / "empty.txt").write_text("  \n")
    fails("absorb", str(tmp_path / "empty.txt"), "--session", "ana", match="is empty")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    fails("export", "ana", str(tmp_path / "full"), match="not an empty directory")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    fails("forget", "ana", "--messages", "999999", match="not messages of session")
    fails("recall", "ana", "--question", " ", match="empty or whitespace")
    assert json.loads(run(capsys, home, "show", "ana", "--json")[1]) == before  # nothing changed


def test_consolidating_a_session_with_nothing_absorbed_says_so(capsys, home):
    from absorber_memory import AbsorberMemory
    from absorber_memory.testing import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer()
    with AbsorberMemory(model, tokenizer=tok, data_dir=home) as memory:
        memory.add_messages([{"role": "user", "content": "hi"}], session_id="new")
    code, out, _ = run(capsys, home, "consolidate", "new")
    assert code == 0 and "nothing absorbed yet" in out
    code, out, _ = run(capsys, home, "consolidate", "new", "--json")
    assert json.loads(out) == {"session": "new", "job": None, "status": None, "error": None}
    assert json.loads(run(capsys, home, "show", "new", "--json")[1])["jobs"] == []


def test_export_needs_an_adapter(capsys, home, tmp_path):
    from absorber_memory import AbsorberMemory
    from absorber_memory.testing import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer()
    with AbsorberMemory(model, tokenizer=tok, data_dir=home) as memory:
        memory.add_messages([{"role": "user", "content": "hi"}], session_id="new")
    code, out, err = run(capsys, home, "export", "new", str(tmp_path / "x"))
    assert code == 2 and "has no adapter yet" in err and not (tmp_path / "x").exists()


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("demo", "bench", "info", "sessions", "show", "absorb", "consolidate", "recall", "forget", "forget-user",
                 "export"):
        assert name in out
